"""The weight fill reproduces the fingerprints the reference outputs were made with."""
import json

import pytest

from tests.official import OFFICIAL_DIR, fill, key_table, needs_official


@needs_official
def test_fill_matches_reference_fingerprints():
    meta = json.loads((OFFICIAL_DIR / "parity" / "meta.json").read_text())
    shapes = {k: s for k, s, _, _ in key_table("vqvae")}
    for key, fp in meta["fingerprints_vae"].items():
        t = fill(key, shapes[key])
        assert t.flatten()[:4].tolist() == pytest.approx(fp["first4"], rel=1e-6, abs=1e-7), key
        assert float(t.double().sum()) == pytest.approx(fp["sum"], rel=1e-5), key
