"""Evaluation: the codebase's metrics, one module per kind.

- image.py: PSNR, SSIM, mask IoU, depth and colour errors of reconstructed views;
- occupancy.py: volumetric IoU, Chamfer-L1, normal consistency and F-score of reconstructed shapes;
- pointcloud.py: COV, MMD and 1-NNA of generated shapes under the Chamfer distance and the EMD;
- fid.py: FID and KID of generated images, and the Inception feature extractor;
- captions.py: BLEU-4, ROUGE-L and CIDEr-D of captions, and the family/colour checks of procedural ones;
- shape_check.py: shape-family and colour checks of objects made from prompts.
"""
