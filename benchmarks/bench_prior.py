"""Speed of the unit prior and of speaking from units, with default-size untrained models.

    python benchmarks/bench_prior.py [--tokens 1000] [--seconds 10] [--threads 2] [--device cpu]

Prints (1) tokens/s of prior generation at ``--tokens`` tokens with and without the KV cache
(target: >= 10x), and (2) the wall time to produce ``--seconds`` of audio end to end: prior
sampling + VQ-VAE decoder + Griffin-Lim (target: faster than real time on 2 CPU cores). Models are
built from conf/ (prior/default, model/mel, quantizer/ema, features/logmel, vocoder/griffin_lim)
with random weights: speed does not depend on training.

On a machine whose cores are busy with other work, run with ``OMP_WAIT_POLICY=PASSIVE`` (or
``--threads 1``): token-by-token generation is a long chain of small ops, and OpenMP threads that
spin at every op's barrier while their partner is descheduled make it crawl (measured here at load
4-5 on 2 cores, KV cache: 20 tokens/s with 2 spinning threads, 328 with OMP_WAIT_POLICY=PASSIVE,
227-367 with 1 thread).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from speechvq.checkpoint import VQVAEMeta
from speechvq.features import FeatureStats, Moments
from speechvq.prior import build_prior, sample_units
from speechvq.synthesis import Synthesizer
from speechvq.vqvae import build_vqvae

CONF = Path(__file__).resolve().parents[1] / "conf"
N_SPEAKERS = 40


def _load(*parts: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF.joinpath(*parts)))


def build_models(device: torch.device):
    cfg = OmegaConf.create({"features": _load("features", "logmel.yaml"),
                            "model": _load("model", "mel.yaml"),
                            "quantizer": _load("quantizer", "ema.yaml")})
    plain = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    vqvae = build_vqvae(plain["model"], plain["quantizer"], N_SPEAKERS)
    n_mels = plain["features"]["n_mels"]
    typical = Moments(torch.full((n_mels,), -6.0), torch.full((n_mels,), 2.0), 1)
    speakers = [f"spk{i}" for i in range(N_SPEAKERS)]
    stats = FeatureStats(plain["features"], typical, {s: typical for s in speakers})
    meta = VQVAEMeta.from_dict({"speakers": speakers, "stats": stats.to_dict(),
                                "features": plain["features"]}, vqvae)
    synth = Synthesizer(vqvae.to(device), meta, _load("vocoder", "griffin_lim.yaml"),
                        source="benchmark")
    prior = build_prior(_load("prior", "default.yaml"), vqvae.n_codes, N_SPEAKERS)
    return synth, prior.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_per_second(prior, n_tokens: int, use_cache: bool, device: torch.device) -> float:
    prompt = torch.tensor([[prior.speaker_token(0)]], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    prior.generate(prompt, 8, generator=gen, use_cache=use_cache)  # warm-up
    _sync(device)
    start = time.perf_counter()
    prior.generate(prompt, n_tokens, generator=gen, use_cache=use_cache)
    _sync(device)
    return n_tokens / (time.perf_counter() - start)


def end_to_end(synth: Synthesizer, prior, seconds: float, device: torch.device) -> dict:
    n_units = round(seconds * synth.unit_rate)
    sample_units(prior, 1, 10, speaker=0)  # warm-up
    synth.decode(torch.zeros(1, 10, dtype=torch.long, device=device), "spk0")
    _sync(device)
    t0 = time.perf_counter()
    units = sample_units(prior, 1, n_units, speaker=0, seed=0)
    _sync(device)
    t1 = time.perf_counter()
    feats = synth.vqvae.decode(units, torch.zeros(1, dtype=torch.long, device=device))
    _sync(device)
    t2 = time.perf_counter()
    wav = synth.decode(units, "spk0")  # decoder again + denormalise + Griffin-Lim
    _sync(device)
    t3 = time.perf_counter()
    total = (t1 - t0) + (t3 - t2)
    assert wav.shape[-1] == round(seconds * synth.sample_rate), (wav.shape, feats.shape)
    return {"prior": t1 - t0, "decoder": t2 - t1, "decoder+vocoder": t3 - t2, "total": total,
            "rtf": total / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synth, prior = build_models(device)
    with torch.inference_mode():
        print(f"speechvq prior benchmark: {device}, {args.threads} thread(s), "
              f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}, "
              f"torch {torch.__version__}")
        print(f"prior: {prior.num_params() / 1e6:.2f} M parameters "
              f"({prior.config.n_layer} layers, d={prior.config.n_embd}, "
              f"vocab {prior.config.vocab_size})")
        cached = tokens_per_second(prior, args.tokens, True, device)
        print(f"generation, {args.tokens} tokens, KV cache:    {cached:9.1f} tokens/s")
        uncached = tokens_per_second(prior, args.tokens, False, device)
        print(f"generation, {args.tokens} tokens, no cache:    {uncached:9.1f} tokens/s")
        print(f"KV-cache speed-up: {cached / uncached:.1f}x (target >= 10x)")
        t = end_to_end(synth, prior, args.seconds, device)
    print(f"{args.seconds:g} s of audio end to end: {t['total']:.2f} s "
          f"(prior {t['prior']:.2f} s, decoder + vocoder {t['decoder+vocoder']:.2f} s of which "
          f"decoder {t['decoder']:.2f} s) -> real-time factor {t['rtf']:.3f} "
          f"({'faster' if t['rtf'] < 1 else 'slower'} than real time)")


if __name__ == "__main__":
    main()
