"""The README's "Python API" examples run as they are written, on a tiny checkpoint built from conf/
with random weights and saved by the project's own checkpoint writer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speechvq
from speechvq.data.manifest import ManifestRow
from speechvq.features import compute_stats
from speechvq.units import write_sidecar
from speechvq.vqvae import build_vqvae

README = Path(__file__).resolve().parents[1] / "README.md"
SR = 16000


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section headed ``## <section>``."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README.md has no '## {section}' section"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch, tiny_vqvae_cfg, save_vqvae) -> Path:
    """What the examples name: a checkpoint, an utterance of speaker 1001, an extracted unit file."""
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    wav = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(SR)).astype(np.float32)
    (tmp_path / "data").mkdir()
    sf.write(tmp_path / "data" / "utt1.wav", wav, SR)
    row = ManifestRow("utt1", str(tmp_path / "data" / "utt1.wav"), SR, "1001")
    cfg = tiny_vqvae_cfg("mel", n_codes=16)
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=2)
    stats = compute_stats([row], cfg["features"], progress=False)
    save_vqvae(tmp_path / "exp/vqvae_mel/checkpoints/best.pt", model, cfg, ["1001", "1002"], stats)
    extracted = tmp_path / "exp/vqvae_mel/units/test.txt"
    speechvq.write_units(extracted, {"utt1": np.arange(50) % 16}, format="gslm")
    write_sidecar(extracted, {"format": "gslm", "unit_rate": 50.0, "n_codes": 16})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_api_examples_run_as_written(workdir: Path) -> None:
    blocks = python_blocks("Python API")
    assert len(blocks) == 4
    for block in blocks:  # three lines each, after the imports
        code = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("import ")]
        assert len(code) <= 3, block
    namespace: dict = {}
    for block in blocks:  # one after the other, as a reader types them
        exec(compile(block, str(README), "exec"), namespace)
    assert isinstance(namespace["model"], speechvq.Synthesizer)
    units = namespace["units"]
    assert units.shape == (50,) and units.min() >= 0 and units.max() < 16
    audio, sr = sf.read(workdir / "utt1_resynth.wav")
    assert sr == SR and len(audio) == 50 * 320
    assert (workdir / "units.txt").read_text().startswith("utt1 ")
    assert namespace["meta"].unit_rate == 50.0 and namespace["meta"].n_codes == 16


def test_api_units_of_a_file_and_of_its_waveform_agree(workdir: Path) -> None:
    model = speechvq.load("exp/vqvae_mel/checkpoints/best.pt")
    wav, _ = sf.read("data/utt1.wav", dtype="float32")
    assert np.array_equal(model.units("data/utt1.wav", "1001"), model.units(wav, "1001"))
    assert model.speak([1, 2, 3]).shape == (3 * model.samples_per_unit,)
