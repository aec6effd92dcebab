"""How good is speech made from speechvq's units: reconstructions and voice conversion against the
original, beside Griffin-Lim of the true mels and Codec2.

    python benchmarks/bench_resynth.py --root ../shared/realdev/wav --alignments ../shared/realdev/ali \
        --minutes 15 --work /tmp/bench_units/realdev
    python benchmarks/bench_resynth.py --mini --minutes 15 --work /tmp/bench_units/mini
    python benchmarks/bench_resynth.py --checkpoint EXP/checkpoints/best.pt --manifest DATA/test.tsv

With ``--root``/``--mini`` the corpus is prepared and the default model trained exactly as
``bench_units.py`` does (same ``--work``/``--exp`` folders, reused when present; extra
``key=value`` arguments go to ``speechvq-train``); with ``--checkpoint`` an existing model is
scored on ``--manifest``. Each test utterance (``--n`` of them, seeded) is made by:

- **speechvq**: its units + its speaker (+ its own F0 track for models with the pitch condition)
  -> decoder -> Griffin-Lim (``speechvq-resynth``'s reconstruction);
- **speechvq, converted**: the same units as another training speaker (the next one in the
  checkpoint's list); F0 is compared with the target speaker's own recordings (``|F0 - target|``:
  the distance of the clip's median log-F0 from that speaker's mean, in the speaker's standard
  deviations);
- **speechvq** rows also give ``|F0 - target|`` for the voice they are decoded in;
- **speechvq, F0 predicted** (pitch models): the units and speaker only, the F0 track predicted
  from them, as prior samples are spoken;
- **speechvq, no quantization** (mel models; a diagnostic): the encoder's continuous latents
  straight into the decoder, the codebook skipped. Its gap to **speechvq** is what the 50 Hz
  bottleneck costs; its gap to Griffin-Lim of the true mels is the decoder's own;
- **k-means of the true mels** (mel models; a reference): each unit's span of the utterance's own
  normalised log-mels (the ``stride`` frames it covers) replaced by the nearest of as many
  centroids as the model has codes, fitted by k-means on the same frames of the training split,
  then Griffin-Lim. It is k-means' (locally optimal) answer to the best frame-wise code of that
  size and rate in squared error on the mels themselves, with no decoder: a unit set that only
  names each 20 ms of spectrum does about this well, whatever decodes it;
- **Griffin-Lim of the true log-mels**: the ceiling of a mel decoder followed by Griffin-Lim;
- **Codec2** 700C and 450 bit/s (8 kHz), when ``c2enc``/``c2dec`` are on PATH (Debian ``codec2``).

Figures per system (means over utterances): STOI, narrow-band PESQ (``pesq`` package), MCD
(:func:`speechvq.quality.mel_cepstral_distortion`), voicing agreement and median F0 error in cents
(:func:`speechvq.quality.f0_error`) and, when ``pocketsphinx`` is installed, the share of the
original's words a recogniser loses (word error rate of the version's transcript against the
original's transcript, both by pocketsphinx's bundled en-us model). Bit rates: speechvq's units at
log2(units used) bits per unit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_units  # noqa: E402  (prepare and train: the same protocol)

from speechvq import quality  # noqa: E402
from speechvq.audio import load_audio  # noqa: E402
from speechvq.baseline import fit_kmeans  # noqa: E402
from speechvq.data.manifest import read_manifest  # noqa: E402
from speechvq.features import build_logmel  # noqa: E402
from speechvq.pitch import F0Moments, f0_track  # noqa: E402
from speechvq.synthesis import Synthesizer, choose_rows  # noqa: E402
from speechvq.vocoder import griffin_lim  # noqa: E402

CODEC2_MODES = ("700C", "450")


# --- the recogniser (optional) ---------------------------------------------------------------

class Recogniser:
    """pocketsphinx with its bundled en-us model: 16 kHz float audio -> lower-case words.

    Every clip gets a fresh decoder (~0.2 s): one decoder carries state from clip to clip, so the
    same audio was recognised differently depending on what came before it (3 of 63 realdev
    clips of Griffin-Lim of the true mels changed their words between two runs).
    """

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder
        Decoder(samprate=16000, loglevel="FATAL")  # fails here if the model is missing

    def words(self, wav: torch.Tensor, sample_rate: int) -> list[str]:
        import torchaudio

        if sample_rate != 16000:
            wav = torchaudio.functional.resample(wav, sample_rate, 16000)
        pcm = (wav.clamp(-1, 1) * 32767).short().numpy().tobytes()
        decoder = self._decoder(samprate=16000, loglevel="FATAL")
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr.lower().split() if hyp is not None else []


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between word lists (substitutions, insertions, deletions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def recogniser() -> Recogniser | None:
    try:
        return Recogniser()
    except ImportError:
        print("pocketsphinx is not installed: no word figures (pip install pocketsphinx)")
        return None


# --- Codec2 (optional) ----------------------------------------------------------------------

def codec2(wav: torch.Tensor, sample_rate: int, mode: str) -> torch.Tensor:
    """``wav`` through ``c2enc``/``c2dec`` at ``mode`` (8 kHz), back at ``sample_rate``."""
    import torchaudio

    x = torchaudio.functional.resample(wav, sample_rate, 8000)
    with tempfile.TemporaryDirectory() as tmp:
        raw, bits, out = (Path(tmp) / n for n in ("in.raw", "out.bit", "out.raw"))
        raw.write_bytes((x.clamp(-1, 1) * 32767).short().numpy().tobytes())
        subprocess.run(["c2enc", mode, str(raw), str(bits)], check=True, capture_output=True)
        subprocess.run(["c2dec", mode, str(bits), str(out)], check=True, capture_output=True)
        y = torch.from_numpy(np.frombuffer(out.read_bytes(), dtype=np.int16).astype(np.float32))
    y = torchaudio.functional.resample(y / 32768.0, 8000, sample_rate)
    return align(wav, y)


def align(ref: torch.Tensor, deg: torch.Tensor, max_ms: float = 60.0, sample_rate: int = 16000
          ) -> torch.Tensor:
    """``deg`` shifted by the lag (within +-max_ms) that best correlates it with ``ref``, cut or
    zero-padded to ``ref``'s length: a codec's delay removed before frame-wise scores (STOI)."""
    n = ref.numel()
    deg = torch.cat([deg, deg.new_zeros(max(0, n - deg.numel()))])[: n + 2048]
    size = 1 << (2 * max(n, deg.numel())).bit_length()
    xc = torch.fft.irfft(torch.fft.rfft(deg.double(), size) * torch.fft.rfft(ref.double(), size)
                         .conj(), size)
    lags = torch.arange(size)
    lags = torch.where(lags < size // 2, lags, lags - size)
    limit = int(max_ms * sample_rate / 1000)
    xc[lags.abs() > limit] = -math.inf
    lag = int(lags[int(xc.argmax())])  # deg[t + lag] matches ref[t]
    shifted = deg[lag:] if lag >= 0 else torch.cat([deg.new_zeros(-lag), deg])
    return torch.cat([shifted, shifted.new_zeros(max(0, n - shifted.numel()))])[:n]


# --- scoring ----------------------------------------------------------------------------------

def target_f0(synth: Synthesizer, speaker: str, rows: list, cache: dict) -> F0Moments | None:
    """log-F0 moments of ``speaker`` over up to 10 of its training utterances."""
    if speaker not in cache:
        mine = [r for r in rows if r.speaker == speaker][:10]
        tracks = [f0_track(load_audio(r.path, synth.sample_rate), synth.sample_rate,
                           synth.front.logmel.hop_length) for r in mine]
        try:
            cache[speaker] = F0Moments.from_tracks(tracks)
        except ValueError:
            cache[speaker] = None
    return cache[speaker]


@torch.no_grad()
def unquantized(synth: Synthesizer, wav: torch.Tensor, speaker: str, voice: str, state, seed: int
                ) -> torch.Tensor:
    """The mel model's reconstruction from the encoder's latents, the quantizer skipped."""
    model = synth.vqvae
    x = synth.front(wav.cpu(), speaker, state).to(synth.device).unsqueeze(0)
    index = torch.tensor([synth.speaker_index(voice)], device=synth.device)
    pitch = None
    if model.pitch_enabled and state is not None and state.pitch is not None:
        pitch = state.pitch.reshape(1, 2, -1).to(synth.device)
    z = model.encoder(x)
    if model.pitch_enabled:
        if pitch is None:
            pitch = model.predict_pitch(model.quantizer.encode(z), index)
        pitch = pitch[..., : z.shape[-1] * model.decoder.upsampling]
    mels = model.decoder(z, index, jitter=False, pitch=pitch)
    return synth.to_audio(mels, [voice], seed, state)[0]


class MelKmeans:
    """k-means over the spans of normalised log-mels that units cover: a frame-wise code of ``k``
    entries at the unit rate fitted to the mels themselves (squared error, locally optimal).

    ``fit`` on training utterances (normalised as the model's input, by the checkpoint's
    statistics); :meth:`quantize` maps normalised log-mels ``(n_mels, F)`` to the same shape,
    each group of ``stride`` frames (``F`` a multiple of it) replaced by its nearest centroid.
    """

    def __init__(self, k: int, stride: int, seed: int = 0, max_frames: int = 200_000) -> None:
        self.k, self.stride, self.seed, self.max_frames = int(k), int(stride), seed, max_frames
        self.centroids: np.ndarray | None = None

    def spans(self, mels: torch.Tensor) -> np.ndarray:
        """(n_mels, F) -> (F // stride, n_mels * stride): one row per unit's frames."""
        n_mels, frames = mels.shape
        u = frames // self.stride
        x = mels[:, : u * self.stride].T.reshape(u, self.stride * n_mels)
        return x.double().numpy()

    def fit(self, synth: Synthesizer, rows: list) -> MelKmeans:
        x = [self.spans(synth.front(load_audio(r.path, synth.sample_rate), r.speaker))
             for r in rows]
        x = np.concatenate(x)
        rng = np.random.default_rng(self.seed)
        if len(x) > self.max_frames:
            x = x[rng.choice(len(x), self.max_frames, replace=False)]
        self.centroids = fit_kmeans(x, self.k, self.seed).cluster_centers_
        return self

    def quantize(self, mels: torch.Tensor) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("fit the k-means first")
        x = torch.from_numpy(self.spans(mels))
        c = torch.from_numpy(self.centroids)
        q = c[torch.cdist(x, c).argmin(1)]  # (U, n_mels * stride)
        return q.reshape(-1, mels.shape[0]).T.to(mels.dtype)


def score_all(synth: Synthesizer, rows: list, train_rows: list, asr: Recogniser | None,
              codec: bool, seed: int) -> dict[str, list[dict]]:
    features, sr = synth.features, synth.sample_rate
    hop = build_logmel(features).hop_length
    synth.add_speakers(rows)
    results: dict[str, list[dict]] = {}
    f0_cache: dict = {}
    speakers = synth.speakers
    kmeans = None
    if synth.vqvae.kind == "mel":
        known = [r for r in train_rows if r.speaker in speakers]
        if known:
            kmeans = MelKmeans(synth.n_codes, synth.samples_per_unit // hop, seed).fit(synth,
                                                                                      known)
    for k, row in enumerate(rows):
        wav = load_audio(row.path, sr)
        units, state = synth.encode_with_state(wav, row.speaker)
        wav = wav[: units.numel() * synth.samples_per_unit]
        voice = row.speaker if row.speaker in speakers else speakers[0]
        target = speakers[(speakers.index(voice) + 1) % len(speakers)]
        versions = {
            "speechvq": synth.decode(units, voice, seed=seed, state=state),
            "speechvq, converted": synth.decode(units, target, seed=seed,
                                                pitch=None if state is None else state.pitch),
            # the true log-mels as the decoder makes them: relative to the utterance's level
            "Griffin-Lim of the true mels": griffin_lim(synth.front.features_of(wav), features,
                                                        seed=seed, **synth.vocoder),
        }
        if synth.vqvae.kind == "mel":
            versions["speechvq, no quantization"] = unquantized(synth, wav, row.speaker, voice,
                                                                state, seed)
        if kmeans is not None:
            mels = kmeans.quantize(synth.front(wav, row.speaker, state)).unsqueeze(0)
            versions[f"k-means of the true mels (K = {kmeans.k})"] = synth.to_audio(
                mels, [row.speaker], seed, state)[0]
        if synth.vqvae.pitch_enabled:  # as prior samples are spoken: F0 from the units
            versions["speechvq, F0 predicted"] = synth.decode(units, voice, seed=seed)
        if codec:
            for mode in CODEC2_MODES:
                versions[f"Codec2 {mode}"] = codec2(wav, sr, mode)
        ref_words = asr.words(wav, sr) if asr else None
        for name, audio in versions.items():
            audio = audio[: wav.numel()]
            fig: dict = {"id": row.id}
            if name != "speechvq, converted":
                fig.update(quality.score(wav, audio, features, pesq=True))
                fig.update(quality.f0_error(wav, audio, sr, hop))
            if name.startswith("speechvq"):  # F0 against the voice's own range
                who = target if name == "speechvq, converted" else voice
                moments = target_f0(synth, who, train_rows, f0_cache)
                f0 = f0_track(audio, sr, hop)
                if moments is not None and bool((f0 > 0).any()):
                    z = (f0[f0 > 0].double().log().median() - moments.mean) / max(moments.std,
                                                                                   1e-3)
                    fig["f0_target_z"] = abs(float(z))  # |median log-F0 - target mean| / std
            if ref_words:
                fig["words_lost"] = word_errors(ref_words, asr.words(audio, sr)) / len(ref_words)
                fig["n_words"] = len(ref_words)
            results.setdefault(name, []).append(fig)
        print(f"\r{k + 1}/{len(rows)} utterances", end="", flush=True)
    print()
    return results


COLUMNS = (("stoi", "STOI", "{:.3f}"), ("pesq_nb", "PESQ-NB", "{:.2f}"), ("mcd", "MCD dB", "{:.2f}"),
           ("voicing_agreement", "voicing", "{:.3f}"), ("f0_cents", "F0 err (cents)", "{:.0f}"),
           ("f0_target_z", "|F0 - target| (sd)", "{:.2f}"), ("words_lost", "words lost", "{:.0%}"))


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, figs in results.items():
        row = {}
        for key, _, _ in COLUMNS:
            vals = [f[key] for f in figs if key in f and not math.isnan(f[key])]
            if key == "words_lost":  # pooled over words, as a corpus WER
                n = sum(f["n_words"] for f in figs if key in f)
                if n:
                    row[key] = sum(f[key] * f["n_words"] for f in figs if key in f) / n
            elif vals:
                row[key] = float(np.mean(vals))
        out[name] = row
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in row for row in summary.values())]
    lines = ["| system | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in summary.items():
        cells = [fmt.format(row[k]) if k in row else "" for k, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="score this VQ-VAE checkpoint (with --manifest)")
    bench_units.add_protocol_arguments(parser, src)
    parser.add_argument("--manifest", help="utterances to score (with --checkpoint)")
    parser.add_argument("--n", type=int, default=None, help="utterances scored (default: all)")
    parser.add_argument("--out", help="where the table and figures go (default: beside the "
                        "checkpoint's experiment)")
    args, overrides = bench_units.parse_with_overrides(parser, argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.checkpoint:
        if not args.manifest:
            parser.error("--checkpoint needs --manifest")
        ckpt, manifest = Path(args.checkpoint), Path(args.manifest)
        out = Path(args.out) if args.out else ckpt.parent.parent / "bench_resynth"
        info = None
    else:
        if not args.work:
            parser.error("--root/--mini need --work")
        work = Path(args.work)
        data, exp = work / "data", work / args.exp
        bench_units.prepare(args, data, need_alignments=False)
        info = bench_units.train(args, data, exp, overrides)
        ckpt, manifest = exp / "checkpoints" / "best.pt", data / "test.tsv"
        out = Path(args.out) if args.out else exp / "bench_resynth"
    synth = Synthesizer.from_checkpoint(ckpt)
    rows = choose_rows(read_manifest(manifest), None, args.n, args.seed, str(manifest))
    train_rows = read_manifest(synth.meta.manifest) if synth.meta.manifest else rows
    codec = shutil.which("c2enc") is not None and shutil.which("c2dec") is not None
    if not codec:
        print("c2enc/c2dec not found: no Codec2 rows (apt install codec2)")
    start = time.perf_counter()
    results = score_all(synth, rows, train_rows, recogniser(), codec, args.seed)
    summary = summarise(results)
    text = table(summary)
    text += (f"\n\n{len(rows)} utterances of {manifest}; model {ckpt}"
             + (f" ({info['steps']} steps, {info['steps_per_second']:.2f} steps/s)" if info
                else "") + f"; scored in {time.perf_counter() - start:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_resynth.txt").write_text(text + "\n")
    (out / "bench_resynth.json").write_text(json.dumps({"summary": summary, "per_utterance":
                                                        results}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
