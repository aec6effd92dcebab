"""Can a neural vocoder trained on a CPU budget beat Griffin-Lim? Train speechvq's Vocos-style
inverse-STFT vocoder (:class:`speechvq.nn.vocoder.ISTFTVocoder`) for ``--minutes`` on the true
log-mels of a prepared corpus' train split, then score it and Griffin-Lim on test utterances.

    python benchmarks/bench_vocoder.py --data /tmp/bench_units/realdev/data --minutes 8

``--data`` is a ``speechvq-prepare`` folder (``train.tsv``, ``test.tsv``), e.g. the one
``bench_units.py`` makes. The vocoder sees the front-end's log-mels (relative to the utterance's
level) and learns the waveform scaled to that level; losses: multi-resolution STFT + ``--mel-weight``
x log-mel L1 (no adversarial loss: the CPU budget). Prints steps/s and STOI / MCD / PESQ-NB of both.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from speechvq import quality
from speechvq.audio import load_audio
from speechvq.data.manifest import read_manifest
from speechvq.features import FrontEnd, build_logmel
from speechvq.nn.decoder import MultiResolutionSTFTLoss
from speechvq.nn.vocoder import ISTFTVocoder
from speechvq.vocoder import griffin_lim

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a speechvq-prepare output folder")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--mel-weight", type=float, default=15.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "features" / "logmel.yaml"))
    cfg["normalize"] = "none"
    front, logmel = FrontEnd(cfg), build_logmel(cfg)
    hop = logmel.hop_length
    crop = 128 * hop
    utts = []
    for row in read_manifest(Path(args.data) / "train.tsv"):
        wav = load_audio(row.path, front.sample_rate)
        utts.append((torch.cat([wav, wav.new_zeros(max(0, crop - wav.numel()))]),
                     front.measure(wav)))
    model = ISTFTVocoder(front.n_mels, hop, channels=args.channels)
    opt = torch.optim.AdamW(model.parameters(), 5e-4)
    stft = MultiResolutionSTFTLoss([[512, 128, 512], [1024, 256, 1024], [256, 64, 256]])

    def log_mel(x: torch.Tensor) -> torch.Tensor:
        return torch.log(logmel.mel_power(x).clamp_min(1e-7))

    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * args.minutes:
        feats, target = [], []
        for _ in range(args.batch):
            wav, state = rng.choice(utts)
            s = rng.randint(0, wav.numel() - crop)
            piece = wav[s : s + crop]
            feats.append(front.features_of(piece, state))
            target.append((piece - state.dc) / math.sqrt(state.ref))  # at the features' level
        x, y = torch.stack(feats), torch.stack(target)
        out = model(x)
        loss = stft(out, y) + args.mel_weight * (log_mel(out) - log_mel(y)).abs().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    print(f"trained {step} steps in {seconds / 60:.1f} min ({step / seconds:.2f} steps/s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
    model.eval()
    scores: dict[str, list] = {"ISTFT vocoder": [], "Griffin-Lim": []}
    with torch.no_grad():
        for row in read_manifest(Path(args.data) / "test.tsv")[: args.n_test]:
            wav = load_audio(row.path, front.sample_rate)
            wav = wav[: wav.numel() // hop * hop]
            state = front.measure(wav)
            voc = model(front.features_of(wav, state)[None])[0]
            gl = griffin_lim(front.features_of(wav, state), cfg)  # the same input as the vocoder
            for name, audio in (("ISTFT vocoder", voc), ("Griffin-Lim", gl)):
                scores[name].append(quality.score(wav, audio, cfg, pesq=True))
    for name, figs in scores.items():
        print(f"{name:14s} {quality.describe(quality.means(figs))}")


if __name__ == "__main__":
    main()
