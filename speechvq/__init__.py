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
``targets``                 cluster targets of masked prediction (MFCC or a model's latents)
``extract``                 chunked, sharded, resumable extraction of unit files
``chunked``                 rows -> units, exactly, in bounded memory (the chunked encoder)
``unit_merge``              joining unit files: shards, splits from their subsets
``synthesis``               units -> audio (:class:`Synthesizer`), samples, resynthesis, pages
``prior``                   build, load and sample the unit prior; its sequences, perplexities
``baseline``                MFCC + k-means units; evaluating a unit file beside them
``report``                  the listening page (HTML, spectrograms, WAVs) and TensorBoard clips
``training``                one fit loop: DDP, AMP, checkpoints, TensorBoard, exact resume
``trainer``                 what a fit is given: trainer config, the Task protocol, run folder
``vqvae``                   encoder + quantizer + decoder; owns the frame geometry
``checkpoint``              self-describing checkpoints, :class:`VQVAEMeta`, output locks
``units``                   unit files in every format, dedup + durations
``sidecar``                 the typed sidecar of a unit file
``metrics``                 PNMI, purities, ABX, bitrate, codebook usage, perplexity
``vocoder``                 log-mels -> waveform (Griffin-Lim)
``data``                    manifests, corpora (folder, mini, LibriSpeech), downloads,
                            how every corpus ends (``data.prepare``), datasets, the fit loop's
                            loaders (``data.loader``), alignments
``features``                the one front-end; the one statistics and front-end-state policy
``stats``                   statistics files: moments, ``stats.json``, ``frontend_state.npz``
``nn``                      pure torch modules: quantizer, encoder, decoder, prior, CPC head,
                            speaker adversary, the log-mel spectrogram, augmentations of log-mels
``audio``                   load/save audio, window reads: mono, resampling, -> AudioError
``files``                   atomic writes (one permission and cleanup policy), JSON, names
``numerics``                precision per device, TF32 / cuDNN policies, sync-free steps
``runtime``                 device, ranks, seeding, replicas, training speed
``threads``                 CPU thread policy: set before torch loads, followed during a run
==========================  ===================================================================

Importing speechvq chooses torch's CPU thread count before torch loads (the cores other processes
leave free) and, with ``SPEECHVQ_CPU=shared``, the passive OpenMP wait policy: see
:mod:`speechvq.threads`.
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
