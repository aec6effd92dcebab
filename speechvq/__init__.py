"""speechvq: discrete speech units from a VQ-VAE, a Transformer prior over them, speech from units.

The Python API (no hydra, no config files)::

    import speechvq

    model = speechvq.load("exp/vqvae_mel/checkpoints/best.pt")   # a trained VQ-VAE (Synthesizer)
    units = model.units("utt.wav")            # an audio file, or a waveform at model.sample_rate
    audio = model.speak(units, speaker="1001")                   # units -> waveform in that voice
    speechvq.write_units("units.txt", {"utt": units}, format="gslm")
    units = speechvq.read_units("units.txt")["utt"]

The stages (prepare, train, extract, evaluate, train-prior, sample, resynth) are the
``speechvq-*`` console scripts (:mod:`speechvq.cli`); each calls one function of the library.

Module map (imports point one way, down this list):

==========================  ===================================================================
``speechvq.cli``            hydra entry points, thin: config -> plain data -> one library call
``tasks``                   what the fit loop trains: VQ-VAE and prior tasks, the two trainings
``extract``                 chunked, sharded extraction of unit files (``speechvq-extract``)
``synthesis``               units -> audio (:class:`Synthesizer`), samples, resynthesis, pages
``prior``                   build, load and sample the unit prior; its sequences, perplexities
``baseline``                MFCC + k-means units; evaluating a unit file beside them
``report``                  the listening page (HTML, spectrograms, WAVs) and TensorBoard clips
``training``                one fit loop: DDP, AMP, checkpoints, TensorBoard, exact resume
``vqvae``                   encoder + quantizer + decoder; owns the frame geometry
``checkpoint``              self-describing checkpoints, :class:`VQVAEMeta`, output locks
``units``                   unit files in every format, dedup + durations, the typed sidecar
``metrics``                 PNMI, purities, ABX, bitrate, codebook usage, perplexity
``vocoder``                 log-mels -> waveform (Griffin-Lim)
``nn``                      pure torch modules: quantizer, encoder, decoder, prior, CPC head
``features``                LogMel and the one front-end; the one statistics policy
``stats``                   normalisation statistics: moments, ``stats.json`` (FeatureStats)
``data``                    manifests, corpora (folder, mini, LibriSpeech), downloads,
                            how every corpus ends (``data.prepare``), datasets, alignments
``audio``                   load/save audio: mono, resampling, validation -> AudioError
``files``                   atomic writes (one permission and cleanup policy), JSON, names
``runtime``                 thread policy (before torch loads), device, ranks, seeding
==========================  ===================================================================

Importing speechvq sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless the user set it),
so torch's CPU threads stay fair when other processes use the cores: see :mod:`speechvq.runtime`.
"""

# Keep this import first, before anything that imports torch: libgomp reads the policy once.
from speechvq import runtime as runtime

# isort: split
from speechvq.synthesis import Synthesizer  # the API's modules load torch: after runtime
from speechvq.units import convert_units, read_sidecar, read_units, write_units

__all__ = ["Synthesizer", "convert_units", "load", "read_sidecar", "read_units", "runtime",
           "write_units"]


def load(checkpoint: str, device: str = "cpu") -> Synthesizer:
    """A trained VQ-VAE from its checkpoint alone, ready to turn audio into units
    (:meth:`Synthesizer.units`) and units into audio (:meth:`Synthesizer.speak`).

    ``device``: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
    """
    return Synthesizer.from_checkpoint(checkpoint, device=runtime.resolve_device(device))
