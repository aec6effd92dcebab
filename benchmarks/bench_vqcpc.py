"""The VQ-CPC reference: an encoder trained with its own contrastive loss and no decoder, on the audio
speechvq trains on, for the same minutes, scored by the protocol of ``bench_units.py``.

    python benchmarks/bench_vqcpc.py --root ../shared/realdev/wav --alignments ../shared/realdev/ali \
        --work /tmp/bench_units/realdev --minutes 15 --eval-split all --exp vqcpc15
    python benchmarks/bench_vqcpc.py --root ../shared/realdev/wav --alignments ../shared/realdev/ali \
        --work /tmp/bench_units/realdev --minutes 15 --eval-split all \
        --extra-train /tmp/bigreal/wav --exp vqcpc15_bigreal

The model and loss follow the published recipe (van Niekerk, Nortje & Kamper, "Vector-quantized
neural networks for acoustic unit discovery in the ZeroSpeech 2020 challenge"; its code,
bshall/VectorQuantizedCPC, was read, and this is a rewrite):

- encoder: a conv over 80 log-mels (kernel 4, stride 2: 50 Hz, as speechvq's units), then four
  blocks of LayerNorm, ReLU and a 512-wide linear layer, a fifth LayerNorm + ReLU and a linear
  layer to 64 dimensions;
- an EMA codebook of 512 x 64 codes (decay 0.999, Laplace-smoothed counts, uniform init in
  +-1/512, commitment weight 0.25, straight-through gradients);
- an LSTM (256) over the quantized latents as the context; one linear predictor per step predicts
  the quantized latent 1..6 steps ahead; InfoNCE against 17 negatives drawn from utterances of the
  same speaker (another time step, any of the batch's utterances of that speaker), scores scaled
  by 1 / sqrt(64);
- batches of 8 speakers x 8 utterances, 128-frame crops (1.28 s); Adam at 4e-4 after a linear
  warmup from 1e-5 (the recipe warms up over 150 epochs of its 300 k steps; here over 150 steps,
  since a CPU budget is a few thousand steps).

Deviations, both so that it sees what speechvq sees: its input is speechvq's model input (the
level-relative, speaker-normalised log-mels of ``speechvq.features.FrontEnd`` for the corpus'
statistics) instead of the recipe's fixed-range log-mels, and crops of utterances shorter than
1.28 s are zero-padded with their padded steps left out of the loss (the recipe drops such
utterances; bigreal's commands and digits are shorter).

Stages (each skipped when its output exists; ``--force`` redoes them): the corpus is prepared as
``bench_units.py`` prepares it (the same ``--work`` folder is shared), the model trains for
``--minutes`` (or ``--steps``) into ``WORK/EXP/vqcpc.pt``, the units of the evaluated split (the
nearest codes of the latents) are written to ``WORK/EXP/units/SPLIT.txt`` with the code vectors in
``codebook.npy``, and ``speechvq-evaluate`` scores them against MFCC + k-means fitted on the same
training audio, at as many clusters as codes used; the same table as ``bench_units.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.data.manifest import read_manifest
from speechvq.features import FrontEnd, stats_for_rows
from speechvq.files import atomic_write
from speechvq.sidecar import Sidecar, write_sidecar
from speechvq.units import write_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_units  # noqa: E402  (the protocol: corpus, --extra-train, evaluation, table)

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLES_PER_UNIT = 320  # 2 mel frames of 160 samples: 50 Hz


class EmaCodebook(nn.Module):
    """VQ with EMA code updates (the recipe's VQEmbeddingEMA, rewritten).

    ``forward(x (..., D))`` -> ``(quantized (..., D) with straight-through gradients, commitment
    loss, indices (...))``; in training mode the codes move to the EMA means of their frames.
    """

    def __init__(self, n_codes: int = 512, dim: int = 64, decay: float = 0.999,
                 epsilon: float = 1e-5, commitment: float = 0.25) -> None:
        super().__init__()
        self.decay, self.epsilon, self.commitment = decay, epsilon, commitment
        codes = torch.empty(n_codes, dim).uniform_(-1 / 512, 1 / 512)
        self.register_buffer("codes", codes)
        self.register_buffer("ema_count", torch.zeros(n_codes))
        self.register_buffer("ema_sum", codes.clone())

    def nearest(self, x: Tensor) -> Tensor:
        """x (..., D) -> the index of each row's nearest code (...)."""
        flat = x.detach().reshape(-1, x.shape[-1])
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codes.T
                + self.codes.pow(2).sum(1))
        return dist.argmin(1).view(x.shape[:-1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = self.nearest(x)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx.reshape(-1), len(self.codes)).to(x.dtype)
                count = self.decay * self.ema_count + (1 - self.decay) * onehot.sum(0)
                n = count.sum()
                self.ema_count.copy_((count + self.epsilon) / (n + len(count) * self.epsilon) * n)
                self.ema_sum.mul_(self.decay).add_(
                    (1 - self.decay) * onehot.T @ x.detach().reshape(-1, x.shape[-1]))
                self.codes.copy_(self.ema_sum / self.ema_count[:, None])
        q = self.codes[idx]
        commit = self.commitment * F.mse_loss(x, q.detach())
        return x + (q - x).detach(), commit, idx


def same_speaker_negatives(target: Tensor, n: int, generator: torch.Generator | None = None
                           ) -> Tensor:
    """target ``(S, U, L, D)``: the steps of U crops of each of S speakers -> ``(S, U, n, L, D)``:
    for each step ``t`` of each crop, ``n`` steps drawn from the same speaker's crops (any of them,
    this one included) at another time than ``t``."""
    s, u, length, _ = target.shape
    other = torch.randint(0, u, (s, u, n, length), generator=generator)
    shift = torch.randint(1, length, (s, u, n, length), generator=generator)
    when = (torch.arange(length) + shift) % length  # never step t itself
    return target[torch.arange(s).view(s, 1, 1, 1), other, when]


class VQCPC(nn.Module):
    """The recipe's encoder, codebook, context network and CPC predictors.

    ``latents(mels (B, n_mels, F))`` -> ``(B, F // 2, z_dim)``; ``units`` -> their codes ``(B, F // 2)``.
    """

    def __init__(self, n_mels: int = 80, channels: int = 512, z_dim: int = 64, c_dim: int = 256,
                 n_codes: int = 512, steps: int = 6, negatives: int = 17) -> None:
        super().__init__()
        self.steps, self.negatives, self.z_dim = steps, negatives, z_dim
        self.conv = nn.Conv1d(n_mels, channels, 4, 2, 1, bias=False)
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.LayerNorm(channels), nn.ReLU(), nn.Linear(channels, channels, bias=False)]
        layers += [nn.LayerNorm(channels), nn.ReLU(), nn.Linear(channels, z_dim)]
        self.mlp = nn.Sequential(*layers)
        self.codebook = EmaCodebook(n_codes, z_dim)
        self.context = nn.LSTM(z_dim, c_dim, batch_first=True)
        self.predictors = nn.ModuleList(nn.Linear(c_dim, z_dim) for _ in range(steps))

    def latents(self, mels: Tensor) -> Tensor:
        return self.mlp(self.conv(mels).transpose(1, 2))

    @torch.no_grad()
    def units(self, mels: Tensor) -> Tensor:
        return self.codebook.nearest(self.latents(mels))

    def loss(self, mels: Tensor, valid: Tensor, n_speakers: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """mels ``(S * U, n_mels, F)``, the crops of ``n_speakers`` speakers in order (U each);
        valid ``(S * U, F // 2)`` real steps -> (CPC + commitment loss, figures)."""
        z, commit, idx = self.codebook(self.latents(mels))
        context, _ = self.context(z)
        batch, frames, dim = z.shape
        s, u = n_speakers, batch // n_speakers
        length = frames - self.steps
        if length < 2:
            raise ValueError(f"crops of {frames} steps are too short for {self.steps} steps ahead")
        zs = z.view(s, u, frames, dim)
        losses, hits = [], []
        for k in range(1, self.steps + 1):
            target = zs[:, :, k : k + length]                             # (S, U, L, D)
            pred = self.predictors[k - 1](context[:, :length]).view(s, u, length, dim)
            negative = same_speaker_negatives(target, self.negatives, generator)
            cand = torch.cat([target.unsqueeze(2), negative], 2)          # (S, U, 1 + N, L, D)
            scores = (cand * pred.unsqueeze(2)).sum(-1) / math.sqrt(dim)  # (S, U, 1 + N, L)
            nll = -scores.log_softmax(2)[:, :, 0]                         # (S, U, L)
            mask = (valid[:, k : k + length] & valid[:, :length]).view(s, u, length).float()
            losses.append((nll * mask).sum() / mask.sum().clamp_min(1))
            hits.append(float(((scores.argmax(2) == 0).float() * mask).sum() / mask.sum().clamp_min(1)))
        cpc = torch.stack(losses).mean()
        used = int(torch.unique(idx[valid]).numel())
        return cpc + commit, {"cpc": float(cpc.detach()), "commit": float(commit.detach()),
                              "accuracy": float(np.mean(hits)), "codes_in_batch": used}


def _task(manifest: Path, exp: Path, seed: int):
    """speechvq's own training data (crops, statistics, front end) for ``manifest``."""
    from hydra import compose, initialize_config_dir

    from speechvq.tasks import VQVAETask

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.manifest={manifest}", f"out_dir={exp}",
                                          "device=cpu", f"seed={seed}"])
    return VQVAETask(OmegaConf.to_container(cfg, resolve=True), out_dir=exp)


def train(task, out: Path, minutes: float, steps: int | None, seed: int, speakers: int = 8,
          per_speaker: int = 8, lr: float = 4e-4, warmup: int = 150) -> dict:
    """Train a :class:`VQCPC` on ``task.train_set``'s crops for ``minutes`` (or ``steps``)."""
    data = task.train_set
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    by_speaker: dict[str, list[int]] = {}
    for i, row in enumerate(data.rows):
        by_speaker.setdefault(row.speaker, []).append(i)
    names = sorted(by_speaker)
    s = min(speakers, len(names))
    model = VQCPC(n_mels=task.front.n_mels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start, step, log = time.monotonic(), 0, []
    bar = tqdm(desc="vq-cpc", unit="step")
    while (steps is None and time.monotonic() - start < minutes * 60) or (
            steps is not None and step < steps):
        data.set_epoch(step)  # fresh crop positions every step
        chosen = rng.choice(len(names), s, replace=False)
        index = [int(i) for c in chosen for i in rng.choice(by_speaker[names[c]], per_speaker)]
        items = [data[i] for i in index]
        mels = torch.stack([it["feats"] for it in items])
        real = torch.tensor([it["num_samples"] // SAMPLES_PER_UNIT for it in items])
        valid = torch.arange(mels.shape[-1] // 2)[None, :] < real[:, None]
        for group in opt.param_groups:
            group["lr"] = 1e-5 + (lr - 1e-5) * min(1.0, (step + 1) / warmup)
        loss, fig = model.loss(mels, valid, s, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        if step % 50 == 0:
            bar.set_postfix(cpc=f"{fig['cpc']:.3f}", acc=f"{fig['accuracy']:.2f}",
                            codes=fig["codes_in_batch"])
            log.append({"step": step, **fig})
    bar.close()
    seconds = time.monotonic() - start
    info = {"steps": step, "seconds": seconds, "steps_per_second": step / max(seconds, 1e-9),
            "speakers_per_batch": s, "utterances_per_speaker": per_speaker, "log": log[-20:]}
    state = {"model": model.state_dict(), "n_mels": task.front.n_mels, **info}
    atomic_write(out, lambda f: torch.save(state, f), mode="wb")
    return info


def extract(model: VQCPC, front: FrontEnd, manifest: Path, out: Path) -> None:
    """The nearest codes of every utterance of ``manifest`` -> gslm ``out`` + sidecar +
    ``codebook.npy`` beside it."""
    units = {}
    for row in tqdm(read_manifest(manifest), desc="units", unit="utt"):
        try:
            wav = load_audio(row.path, front.sample_rate)
        except AudioError as err:
            tqdm.write(f"skipping {err}")
            continue
        wav = wav[: wav.numel() // SAMPLES_PER_UNIT * SAMPLES_PER_UNIT]
        units[row.id] = model.units(front(wav, row.speaker).unsqueeze(0))[0].numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.parent / "codebook.npy", model.codebook.codes.double().numpy())
    write_units(out, units, "gslm")
    write_sidecar(out, Sidecar(format="gslm", unit_rate=50.0, n_codes=len(model.codebook.codes),
                               model_kind="vqcpc", manifest=str(manifest.resolve())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_units.add_protocol_arguments(parser, parser.add_mutually_exclusive_group(required=True))
    parser.add_argument("--eval-split", choices=("test", "all"), default="test")
    parser.set_defaults(exp="vqcpc")
    args = parser.parse_args(argv)
    if not args.work:
        parser.error("--work is required")
    work = Path(args.work)
    data, exp = work / "data", work / args.exp
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bench_units.prepare(args, data)
    train_manifest = bench_units.prepare_extra(args, data, work)
    exp.mkdir(parents=True, exist_ok=True)
    ckpt, timing = exp / "vqcpc.pt", exp / "bench_train.json"
    task = None
    if not (ckpt.exists() and timing.exists()) or args.force:
        task = _task(train_manifest, exp, args.seed)
        info = train(task, ckpt, args.minutes, args.steps, args.seed)
        rows = read_manifest(train_manifest)
        info.update(train_manifest=str(train_manifest), train_utterances=len(rows),
                    train_hours=sum(r.num_samples for r in rows) / 16000 / 3600)
        timing.write_text(json.dumps(info, indent=1) + "\n")
    info = json.loads(timing.read_text())
    split = args.eval_split
    manifest = data / ("manifest.tsv" if split == "all" else f"{split}.tsv")
    units, report_path = exp / "units" / f"{split}.txt", exp / "eval" / f"{split}.json"
    if not report_path.exists() or args.force:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = VQCPC(n_mels=int(state["n_mels"]))
        model.load_state_dict(state["model"])
        model.eval()
        task = task or _task(train_manifest, exp, args.seed)
        stats, _ = stats_for_rows(task.features, task.stats, read_manifest(manifest),
                                  stats_json=data / "stats.json")
        extract(model, FrontEnd(task.features, stats), manifest, units)
        bench_units._run([bench_units._tool("speechvq-evaluate"), f"units={units}",
                          f"alignments={data / 'alignments'}", f"data.manifest={manifest}",
                          f"baseline.train_manifest={train_manifest}",
                          f"codebook={units.parent / 'codebook.npy'}", f"out={report_path}"],
                         exp / f"bench_evaluate_{split}.log")
    text = bench_units.table(json.loads(report_path.read_text()), info).replace(
        "speechvq", "  VQ-CPC", 1)
    (exp / f"bench_vqcpc_{split}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
