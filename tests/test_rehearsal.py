"""scripts/rehearse_paper.py's stand-ins go through the real download code, and the metadata overrides it relies on
($SRMAP_DIV2K_JSON, $SRMAP_BASELINES_JSON) are announced and checked. The rehearsal itself (about 3 minutes here) runs
outside CI; its command and output are in docs/cluster.md."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from conftest import ROOT


def rehearsal_module():
    """scripts/rehearse_paper.py imported as a module."""
    spec = importlib.util.spec_from_file_location("rehearse_paper", ROOT / "scripts" / "rehearse_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stand_ins_are_fetched_verified_and_extracted_like_div2k(tmp_path, monkeypatch, capsys):
    import srmap.baselines as baselines
    import srmap.download as download

    rp = rehearsal_module()
    served = tmp_path / "served"
    served.mkdir()
    archives, weights = rp.stand_in_archives(served), rp.fabricated_weights(served)
    server, url = rp.serve(served)
    try:
        env = rp.metadata(tmp_path, url, archives, weights)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(download, "DIV2K", download._load_metadata())
        monkeypatch.setattr(baselines, "WEIGHTS", baselines._load_weights())
        assert "$SRMAP_DIV2K_JSON: using" in capsys.readouterr().err  # an override never goes unnoticed
        got = download.download_div2k(tmp_path / "hr", ids={"train": (1, 4), "valid": (801, 802)},
                                      archives_dir=tmp_path / "archives", progress=False)
        assert [p.name for p in got["train"]] == ["0001.png", "0002.png", "0003.png", "0004.png"]
        with Image.open(got["valid"][0]) as im:
            assert im.size == (rp.VALID_CROP, rp.VALID_CROP)
        path = baselines.fetch_weights("esrgan", tmp_path / "models", progress=False)
        assert path.read_bytes() == weights["rehearsal-esrgan.pth"]
    finally:
        server.shutdown()


def test_a_bad_metadata_override_is_one_line_naming_it(tmp_path, monkeypatch):
    import srmap.download as download

    bad = tmp_path / "div2k.json"
    bad.write_text("{not json")
    monkeypatch.setenv("SRMAP_DIV2K_JSON", str(bad))
    with pytest.raises(ValueError) as err:
        download._load_metadata()
    assert str(bad) in str(err.value) and "$SRMAP_DIV2K_JSON" in str(err.value) and "\n" not in str(err.value)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        download._load_metadata()


def test_overrides_cut_the_paper_profile_and_nothing_else():
    # Every override names a paper key (or the profile) and the values parse; the networks, tile pad,
    # precision and baselines stay the paper's.
    rp = rehearsal_module()
    keys = [o.split("=", 1)[0] for o in rp.OVERRIDES + rp.NO_COMPILE]
    assert keys[0] == "profile" and all(k.startswith("paper.") for k in keys[1:])
    assert not [k for k in keys if k.startswith(("paper.model", "paper.evaluate", "paper.baselines"))]
    assert not [k for k in keys if k.endswith((".amp", ".channels_last", ".lr_patch"))]
