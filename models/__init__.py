"""Networks: tokenizers, generators and condition encoders (the VQVAE and AR issues)."""
