"""The mini corpus: phone-aligned English speech synthesised with flite, in LibriSpeech's layout.

::

    generate_corpus(out_root, sentences=None, voices=("kal16", "awb", "rms", "slt"),
                    n_per_voice={"train": 40, "valid": 7, "test": 10}, seed=0,
                    first_speaker=1001, duration_stretch=(0.9, 1.15), f0_shift=(0.9, 1.1),
                    sample_rate=16000, overwrite=False, flite="flite", progress=True) -> dict

writes::

    <out_root>/SPEAKERS.TXT                       LibriSpeech's format; NAME says which flite voice
    <out_root>/utterances.tsv                     every utterance's text and synthesis settings
    <out_root>/synth.json                         the arguments, flite version and a summary
    <out_root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16 kHz, 16 bit
    <out_root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.phn    start end phone (s)
    <out_root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt        ID UPPERCASE TEXT

Splits are ``train``, ``valid`` and ``test``; chapter is 1, 2, 3 for them. Each voice is one
numeric speaker (``first_speaker``, ``first_speaker + 1``, ... in ``voices`` order) and appears in
every split. The sentences (default: the ~400 original sentences in ``sentences.txt`` beside this
module) are shuffled with ``seed`` and cut into disjoint pools, so no test or valid sentence is ever
heard in training: the test pool is ``n_per_voice["test"]`` sentences read by *every* voice
(parallel text, so across-speaker ABX compares identical contexts and a voice conversion can be
compared with the target voice reading the same words), the valid pool likewise, and each voice
reads its own stretch of the remaining train pool (voices share train sentences only once a voice
reads more than ``1/len(voices)`` of it).
Each utterance gets its own flite ``duration_stretch`` (uniform in ``duration_stretch``) and
``f0_shift`` (uniform in ``f0_shift``), drawn from a generator seeded by ``(seed, voice, split,
index)``: the same arguments give the same corpus, and raising ``n_per_voice["train"]`` keeps
every existing utterance (id, text, settings) unchanged; changing the valid/test counts re-cuts
the sentence pools.

Measured with Debian's flite 2.2 (``flite -voice V -psdur -t TEXT -o x.wav``):

- kal16, awb, rms and slt all write 16 kHz mono 16-bit WAV (``kal`` is 8 kHz; any other rate is
  resampled to ``sample_rate`` with torchaudio).
- ``-psdur`` prints ``phone:end_time`` pairs (``pau`` for silence, written here as ``sil``). For
  awb, rms and slt the last end time is 0-5 ms past the end of the audio; kal16 cuts its final
  pause short, so its last end time is 0.09-0.12 s (mean 0.107 s) past the audio. The final silence
  is clipped (or extended) to the audio, so every ``.phn`` ends exactly at the audio's end, and an
  utterance whose last *phone* ends more than 20 ms after its audio is refused. The offsets are kept
  per utterance in ``utterances.tsv`` (``align_offset``) and summarised in ``synth.json``.
- Phone times match the audio: on the shipped corpus the shift of the ``.phn`` speech/silence
  labels that best separates loud from quiet 10 ms frames is 0 frames for kal16, awb and rms and
  +1 frame (10 ms) for slt, whose sentences often open with a weak dh or hh.
- ``--setf duration_stretch=`` scales durations on every voice; ``--setf f0_shift=`` scales the
  pitch of kal16, awb and slt; rms ignores it (so no shift is recorded for rms).

The corpus shipped in ``egs/mini/corpus`` is ``generate_corpus("egs/mini/corpus")`` with the
defaults above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechvq.data.alignments import Interval, write_phn
from speechvq.data.folder import inspect_candidates, librispeech_candidates
from speechvq.data.manifest import ManifestRow
from speechvq.data.prepare import SPLITS, Corpus, PrepareError, finish
from speechvq.files import write_text

__all__ = ["CHAPTERS", "DEFAULT_N_PER_VOICE", "DEFAULT_VOICES", "SPLITS", "FliteError",
           "check_sentences", "Utterance", "default_sentences_path", "find_flite",
           "generate_corpus", "load_sentences", "plan_corpus", "prepare_mini", "synthesize",
           "transcript"]

log = logging.getLogger(__name__)

DEFAULT_VOICES = ("kal16", "awb", "rms", "slt")
MINI_CORPUS = Path(__file__).resolve().parents[2] / "egs" / "mini" / "corpus"  # shipped
CHAPTERS = {"train": 1, "valid": 2, "test": 3}
DEFAULT_N_PER_VOICE: Mapping[str, int] = MappingProxyType({"train": 40, "valid": 7, "test": 10})
_VOICE_SEX = {"kal": "M", "kal16": "M", "awb": "M", "awb_time": "M", "rms": "M", "slt": "F"}
_NO_F0_CONTROL = frozenset({"rms"})  # measured: its pitch does not follow f0_shift
_ALIGN_TOLERANCE = 0.02  # seconds: one 50 Hz unit frame
_SENTENCE_OK = re.compile(r"[A-Za-z][A-Za-z ,.'?!;:-]*")
_FLITE_PAIR = re.compile(r"([^\s:]+):(-?[0-9.]+)")


class FliteError(RuntimeError):
    """flite is missing, lacks a voice, fails, or returns phone times that do not fit its audio."""


@dataclass(frozen=True)
class Utterance:
    """One planned utterance of the corpus."""

    id: str
    split: str
    speaker: int
    chapter: int
    voice: str
    text: str
    duration_stretch: float
    f0_shift: float | None


# --------------------------------------------------------------------------------------------
# text


def default_sentences_path() -> Path:
    """The sentences shipped with speechvq (original text, MIT licence)."""
    return Path(__file__).with_name("sentences.txt")


def load_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """One sentence per line (``#`` lines and blank lines skipped), checked for use with flite.

    Sentences must be letters, spaces and ``, . ' ? ! ; : -`` only (digits and symbols would be
    spoken as words the transcript does not contain) and unique once normalised. Errors name
    ``path:line``.
    """
    path = Path(path) if path is not None else default_sentences_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read sentences: {err}") from err
    return check_sentences(lines, str(path))


def check_sentences(lines: Sequence[str], source: str = "sentences") -> list[str]:
    """Normalise spaces, drop blank and ``#`` lines, and check the rest as :func:`load_sentences`.

    Errors name ``source:line`` (line numbers count from 1 over ``lines``).
    """
    out: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        text = " ".join(raw.split())
        if not text or text.startswith("#"):
            continue
        if not _SENTENCE_OK.fullmatch(text):
            raise ValueError(
                f"{source}:{lineno}: sentence may hold only letters, spaces and , . ' ? ! ; : - "
                f"(spell numbers out): {text!r}"
            )
        key = transcript(text)
        if key in seen:
            raise ValueError(f"{source}:{lineno}: sentence repeats line {seen[key]}: {text!r}")
        seen[key] = lineno
        out.append(text)
    if not out:
        raise ValueError(f"{source}: no sentences")
    return out


def transcript(text: str) -> str:
    """LibriSpeech-style transcript: upper case words and apostrophes, no other punctuation."""
    return " ".join(re.sub(r"[^A-Z']+", " ", text.upper()).split())


# --------------------------------------------------------------------------------------------
# flite


def find_flite(flite: str = "flite") -> str:
    """The path of the flite executable, or :class:`FliteError` saying how to install it."""
    found = shutil.which(flite)
    if found is None:
        raise FliteError(
            f"flite executable {flite!r} not found: the mini corpus is synthesised with flite "
            "(Debian/Ubuntu: `apt-get install flite`; macOS: `brew install flite`). The shipped "
            "copy in egs/mini/corpus needs no flite."
        )
    return found


def _flite_run(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    except subprocess.CalledProcessError as err:
        raise FliteError(
            f"flite failed ({what}): exit {err.returncode}: {err.stderr.strip()}"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise FliteError(f"flite timed out ({what})") from err


def _flite_voices(flite: str) -> list[str]:
    out = _flite_run([flite, "-lv"], "listing voices").stdout
    return out.split(":", 1)[-1].split()


def _flite_version(flite: str) -> str:
    # flite --version prints its banner and exits with status 1
    proc = subprocess.run([flite, "--version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"version:\s*(\S+)", proc.stdout + proc.stderr)
    return m.group(1) if m else "unknown"


def _fit_to_audio(
    phones: list[tuple[str, float]], duration: float, what: str
) -> tuple[list[Interval], float]:
    """flite's ``(phone, end)`` pairs -> intervals covering exactly ``[0, duration]``."""
    speech_ends = [end for label, end in phones if label != "pau"]
    if speech_ends and speech_ends[-1] > duration + _ALIGN_TOLERANCE:
        raise FliteError(
            f"{what}: last phone ends at {speech_ends[-1]:.3f} s but the audio lasts "
            f"{duration:.3f} s: flite's phone times do not match its audio"
        )
    intervals: list[Interval] = []
    start = 0.0
    for label, end in phones:
        end = min(end, duration)
        if end > start:
            intervals.append(
                Interval(round(start, 7), round(end, 7), "sil" if label == "pau" else label)
            )
            start = end
    if start < duration:  # audio left after the last time flite printed: silence
        if intervals and intervals[-1].label == "sil":
            last = intervals.pop()
            intervals.append(Interval(last.start, round(duration, 7), "sil"))
        else:
            intervals.append(Interval(round(start, 7), round(duration, 7), "sil"))
    return intervals, phones[-1][1] - duration


def synthesize(
    text: str,
    voice: str,
    duration_stretch: float = 1.0,
    f0_shift: float | None = None,
    sample_rate: int = 16000,
    flite: str = "flite",
) -> tuple[np.ndarray, list[Interval], float]:
    """Speak ``text`` with flite; return ``(wav, intervals, offset)``.

    ``wav``: (T,) int16 at ``sample_rate``; ``intervals``: phones (``pau`` -> ``sil``) covering
    the audio exactly; ``offset``: flite's last end time minus the audio duration, in seconds.
    """
    exe = find_flite(flite)
    args = [exe, "-voice", voice, "--setf", f"duration_stretch={duration_stretch:g}"]
    if f0_shift is not None:
        args += ["--setf", f"f0_shift={f0_shift:g}"]
    what = f"voice {voice}, text {text!r}"
    with tempfile.TemporaryDirectory(prefix="speechvq-flite-") as tmp:
        wav_path = os.path.join(tmp, "out.wav")
        out = _flite_run([*args, "-psdur", "-t", text, "-o", wav_path], what).stdout
        try:
            wav, sr = sf.read(wav_path, dtype="int16", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise FliteError(f"flite wrote no readable audio ({what}): {err}") from err
    wav = wav[:, 0]
    if sr != sample_rate:  # e.g. the 8 kHz "kal" voice
        import torch
        import torchaudio.functional as AF

        log.info("resampling flite voice %s from %d Hz to %d Hz", voice, sr, sample_rate)
        x = AF.resample(torch.from_numpy(wav.astype(np.float32) / 32768.0), sr, sample_rate)
        wav = (x.clamp(-1.0, 32767 / 32768).numpy() * 32768.0).round().astype(np.int16)
    phones = [(m.group(1), float(m.group(2))) for m in _FLITE_PAIR.finditer(out)]
    if not phones:
        raise FliteError(f"flite printed no phone times ({what}): {out.strip()[:200]!r}")
    ends = [end for _label, end in phones]
    if any(b < a for a, b in zip(ends, ends[1:], strict=False)):
        raise FliteError(
            f"flite's phone end times go backwards ({what}); give one sentence per line"
        )
    intervals, offset = _fit_to_audio(phones, len(wav) / sample_rate, what)
    return wav, intervals, offset


# --------------------------------------------------------------------------------------------
# the corpus


def _check_counts(n_per_voice: Mapping[str, int]) -> dict[str, int]:
    if set(n_per_voice) != set(SPLITS):
        raise ValueError(f"n_per_voice needs exactly the keys {SPLITS}, got {sorted(n_per_voice)}")
    counts = {s: int(n_per_voice[s]) for s in SPLITS}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"n_per_voice values must be >= 0, got {counts}")
    return counts


def plan_corpus(
    sentences: Sequence[str],
    voices: Sequence[str] = DEFAULT_VOICES,
    n_per_voice: Mapping[str, int] | None = None,
    seed: int = 0,
    first_speaker: int = 1001,
    duration_stretch: tuple[float, float] = (0.9, 1.15),
    f0_shift: tuple[float, float] = (0.9, 1.1),
) -> list[Utterance]:
    """Every utterance of the corpus (ids, texts, settings) without synthesising anything.

    Arguments as in :func:`generate_corpus`. Raises ``ValueError`` when the sentences cannot fill
    the splits without repeating a sentence within a voice or across splits.
    """
    counts = _check_counts(n_per_voice or DEFAULT_N_PER_VOICE)
    if len(set(voices)) != len(voices) or not voices:
        raise ValueError(f"voices must be a non-empty list of distinct names, got {list(voices)}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    shuffled = [sentences[i] for i in order]
    n_test, n_valid = counts["test"], counts["valid"]
    pools = {
        "test": shuffled[:n_test],
        "valid": shuffled[n_test : n_test + n_valid],
        "train": shuffled[n_test + n_valid :],
    }
    if counts["train"] > len(pools["train"]) or n_test + n_valid > len(sentences):
        raise ValueError(
            f"{len(sentences)} sentences cannot give {n_test} test + {n_valid} valid sentences "
            f"(shared by every voice) and {counts['train']} more train sentences per voice: "
            "supply more sentences or ask for fewer utterances"
        )
    plan = []
    for v, voice in enumerate(voices):
        speaker = first_speaker + v
        for s, split in enumerate(SPLITS):
            pool = pools[split]
            # parallel text in valid/test; in train each voice starts at its own 1/len(voices) of
            # the pool, so asking for more train utterances keeps the earlier ones' texts
            first = 0 if split != "train" else v * (len(pool) // len(voices))
            for i in range(counts[split]):
                k = (first + i) % len(pool)
                rng = np.random.default_rng([seed, zlib.crc32(voice.encode()), s, i])
                stretch = round(float(rng.uniform(*duration_stretch)), 3)
                shift = round(float(rng.uniform(*f0_shift)), 3)
                chapter = CHAPTERS[split]
                plan.append(
                    Utterance(
                        id=f"{speaker}-{chapter}-{i:04d}",
                        split=split,
                        speaker=speaker,
                        chapter=chapter,
                        voice=voice,
                        text=pool[k],
                        duration_stretch=stretch,
                        f0_shift=None if voice in _NO_F0_CONTROL else shift,
                    )
                )
    return plan


def _write_flac(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    try:
        sf.write(path, wav, sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
    except TypeError:  # soundfile < 0.12.1 has no compression_level
        sf.write(path, wav, sample_rate, format="FLAC", subtype="PCM_16")


def _prepare_target(out_root: Path, overwrite: bool) -> None:
    if not out_root.exists():
        return
    if not out_root.is_dir():
        raise FileExistsError(f"{out_root}: exists and is not a folder")
    if not overwrite:
        raise FileExistsError(
            f"{out_root}: corpus folder exists (pass overwrite=True to replace it)"
        )
    if any(out_root.iterdir()) and not (out_root / "synth.json").exists():
        raise FileExistsError(
            f"{out_root}: not empty and not a generated corpus (no synth.json): refusing to replace it"
        )


def _speakers_txt(plan: list[Utterance], seconds: dict[str, float]) -> str:
    lines = [
        "; Speakers of the speechvq mini corpus, synthesised with flite (see synth.json).\n",
        "; Columns as in LibriSpeech's SPEAKERS.TXT; every speaker reads in every split.\n",
        ";ID  |SEX| SUBSET           |MINUTES| NAME\n",
    ]
    voices = {u.speaker: u.voice for u in plan}
    for speaker, voice in sorted(voices.items()):
        minutes = sum(sec for uid, sec in seconds.items() if uid.startswith(f"{speaker}-")) / 60
        splits = ",".join(
            s for s in SPLITS if any(u.speaker == speaker and u.split == s for u in plan)
        )
        sex = _VOICE_SEX.get(voice, "-")
        lines.append(f"{speaker:<5}| {sex} | {splits:<16} | {minutes:5.2f} | flite {voice}\n")
    return "".join(lines)


def generate_corpus(
    out_root: str | os.PathLike,
    sentences: str | os.PathLike | Sequence[str] | None = None,
    voices: Sequence[str] = DEFAULT_VOICES,
    n_per_voice: Mapping[str, int] | None = None,
    seed: int = 0,
    first_speaker: int = 1001,
    duration_stretch: tuple[float, float] = (0.9, 1.15),
    f0_shift: tuple[float, float] = (0.9, 1.1),
    sample_rate: int = 16000,
    overwrite: bool = False,
    flite: str = "flite",
    progress: bool = True,
) -> dict:
    """Synthesise the mini corpus into ``out_root`` (layout in the module docstring).

    ``sentences``: a text file (one per line) or a list of sentences; None -> the shipped
    ``sentences.txt``. ``n_per_voice``: utterances per voice for each of ``train``/``valid``/
    ``test``; None -> ``{"train": 40, "valid": 7, "test": 10}`` (the shipped copy). The corpus is
    built in a temporary sibling folder and moved into place at the end, so an interrupted run
    leaves no half corpus; an existing ``out_root`` is replaced only with ``overwrite=True`` and
    only if it is empty or an earlier generated corpus. Returns the summary also stored in
    ``synth.json`` (utterances, minutes per split and speaker, bytes, flite's alignment offsets).
    """
    exe = find_flite(flite)
    if isinstance(sentences, (str, os.PathLike)) or sentences is None:
        # the shipped file is recorded by name so synth.json does not depend on the checkout path
        source = str(sentences) if sentences is not None else "speechvq/data/sentences.txt"
        texts = load_sentences(sentences)
    else:
        source = "<list>"
        texts = check_sentences(list(sentences))
    counts = _check_counts(n_per_voice or DEFAULT_N_PER_VOICE)
    plan = plan_corpus(texts, voices, counts, seed, first_speaker, duration_stretch, f0_shift)
    available = _flite_voices(exe)
    version = _flite_version(exe)
    for voice in voices:
        if "/" not in voice and not voice.endswith(".flitevox") and voice not in available:
            raise FliteError(f"flite has no voice {voice!r} (it has: {' '.join(available)})")
    out_root = Path(out_root)
    _prepare_target(out_root, overwrite)
    out_root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.", suffix=".tmp", dir=out_root.parent))
    try:
        summary = _synthesize_plan(build, plan, exe, sample_rate, progress)
        summary["arguments"] = {
            "sentences": source,
            "sentences_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "voices": list(voices),
            "n_per_voice": counts,
            "seed": seed,
            "first_speaker": first_speaker,
            "duration_stretch": list(duration_stretch),
            "f0_shift": list(f0_shift),
            "sample_rate": sample_rate,
        }
        summary["flite_version"] = version
        (build / "synth.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.chmod(build, 0o755)
        if out_root.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_root.name}.", suffix=".old", dir=out_root.parent)
            )
            os.replace(out_root, old / "corpus")
            os.replace(build, out_root)
            shutil.rmtree(old)
        else:
            os.replace(build, out_root)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    summary["root"] = str(out_root)
    log.info(
        "wrote %d utterances (%.1f min, %.1f MB) to %s",
        summary["utterances"],
        summary["minutes"],
        summary["bytes"] / 1e6,
        out_root,
    )
    return summary


def _synthesize_plan(
    root: Path, plan: list[Utterance], flite: str, sample_rate: int, progress: bool
) -> dict:
    seconds: dict[str, float] = {}
    offsets: dict[str, list[float]] = {}
    trans: dict[Path, list[str]] = {}
    rows = [
        "id\tsplit\tspeaker\tvoice\tduration_stretch\tf0_shift\tnum_samples\talign_offset\ttext\n"
    ]
    total_bytes = 0
    for u in tqdm(plan, desc="flite", unit="utt", disable=not progress):
        wav, intervals, offset = synthesize(
            u.text, u.voice, u.duration_stretch, u.f0_shift, sample_rate, flite
        )
        folder = root / u.split / str(u.speaker) / str(u.chapter)
        folder.mkdir(parents=True, exist_ok=True)
        _write_flac(folder / f"{u.id}.flac", wav, sample_rate)
        write_phn(folder / f"{u.id}.phn", intervals)
        total_bytes += (folder / f"{u.id}.flac").stat().st_size
        trans.setdefault(folder / f"{u.speaker}-{u.chapter}.trans.txt", []).append(
            f"{u.id} {transcript(u.text)}\n"
        )
        seconds[u.id] = len(wav) / sample_rate
        offsets.setdefault(u.voice, []).append(offset)
        f0 = "" if u.f0_shift is None else f"{u.f0_shift:g}"
        rows.append(
            f"{u.id}\t{u.split}\t{u.speaker}\t{u.voice}\t{u.duration_stretch:g}\t{f0}\t{len(wav)}"
            f"\t{offset:.4f}\t{u.text}\n"
        )
    for path, lines in trans.items():
        path.write_text("".join(sorted(lines)), encoding="utf-8")
    (root / "SPEAKERS.TXT").write_text(_speakers_txt(plan, seconds), encoding="utf-8")
    (root / "utterances.tsv").write_text("".join(rows), encoding="utf-8")
    splits = {}
    for split in SPLITS:
        ids = [u.id for u in plan if u.split == split]
        splits[split] = {
            "utterances": len(ids),
            "minutes": round(sum(seconds[i] for i in ids) / 60, 3),
        }
    speakers = {}
    for u in plan:
        entry = speakers.setdefault(str(u.speaker), {"voice": u.voice, "minutes": {}})
        if u.split not in entry["minutes"]:
            ids = [w.id for w in plan if w.speaker == u.speaker and w.split == u.split]
            entry["minutes"][u.split] = round(sum(seconds[i] for i in ids) / 60, 3)
    return {
        "utterances": len(plan),
        "minutes": round(sum(seconds.values()) / 60, 3),
        "bytes": total_bytes,
        "splits": splits,
        "speakers": speakers,
        "align_offset_seconds": {
            v: {
                "mean": round(float(np.mean(o)), 4),
                "min": round(float(np.min(o)), 4),
                "max": round(float(np.max(o)), 4),
            }
            for v, o in offsets.items()
        },
    }


# --- the data=mini prepare stage -------------------------------------------------------------


def prepare_mini(data: Mapping, out_dir: str | os.PathLike, features: Mapping, *,
                 stats: bool = True, state_unit: int | None = None, workers: int = 1,
                 progress: bool = True) -> None:
    """``data=mini``: the shipped corpus (or ``data["root"]``, or a fresh one with
    ``data["regenerate"]``), its own train/valid/test split and .phn alignments copied to
    OUT/alignments/; then :func:`speechvq.data.prepare.finish`."""
    out_dir = Path(out_dir)
    root = _mini_root(data, out_dir, progress)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise PrepareError(f"{root}: not a mini corpus (no {'/'.join(missing)} folder); "
                           "regenerate it with data.regenerate=true")
    splits: dict[str, list[ManifestRow]] = {}
    corpus = Corpus([], [], splits)
    for name in SPLITS:
        try:
            items, bad = librispeech_candidates(root / name)
        except ValueError as err:
            raise PrepareError(f"{root / name}: {err}") from None
        splits[name], bad_audio, notes = inspect_candidates(
            items, int(features["sample_rate"]), float(data.get("min_seconds", 0.0)), workers,
            progress)
        corpus.rejected += bad + bad_audio
        corpus.notes.update(notes)
    corpus.rows = [r for name in SPLITS for r in splits[name]]
    if not splits["train"]:
        raise PrepareError(f"{root / 'train'}: no usable utterances")
    ids = [r.id for r in corpus.rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PrepareError(f"{root}: utterance id(s) in more than one split: {dup[:10]}")
    n_missing = 0
    for row in corpus.rows:
        phn = Path(row.path).with_suffix(".phn")
        if phn.is_file():
            write_text(out_dir / "alignments" / f"{row.id}.phn", phn.read_text())
        else:
            n_missing += 1
    if n_missing:
        log.warning("%d utterance(s) have no .phn alignment beside their audio", n_missing)
    finish(corpus, out_dir, features if stats else None, int(features["sample_rate"]),
           state_unit=state_unit, workers=workers, progress=progress)


def _mini_root(data: Mapping, out_dir: Path, progress: bool) -> Path:
    if data.get("regenerate"):
        root = out_dir / "corpus"
        log.info("synthesising the mini corpus into %s", root)
        generate_corpus(root, overwrite=True, progress=progress, **dict(data.get("synth") or {}))
        return root
    return Path(data["root"]).expanduser() if data.get("root") else MINI_CORPUS
