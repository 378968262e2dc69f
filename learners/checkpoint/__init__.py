"""Atomic checkpoint folders: tmp + fsync + rename, newest complete one wins.

Layout of ``state_dir``::

    ckpt-<model_version:012d>-<seq>/     one complete checkpoint
        MANIFEST.json          written last: size and sha256 of every other file
        config.json            the LearnerConfig it was written with
        state.json             scalars, optimizer parameter names, sizes
        state.safetensors      pending samples, published table, RNG states
        learner.safetensors    the TwoTower module's own state (projections,
                               id embeddings, global context, trained top layers)
        optimizer.safetensors  per-parameter optimizer state, keyed by parameter name
        ewc.safetensors        EWC importances and anchors (when EWC is on)
        replay.safetensors     replay reservoir samples (when replay is on; seen count in state.json)
        serving_average.safetensors  averaged weights vectors are published from (when on)
        users.safetensors      user history rings and profiles;  users.json: user ids (LRU order)
        features.safetensors   cached frozen token states (concatenated + lengths),
                               pooled text features, has-text flags
        catalogue.json         item ids and texts
        extra.json             the caller's ``extra`` dict (Kafka offsets, ledger, ...)
        model/                 Hugging Face folder of the fine-tuned encoder, trained
                               layers merged in (``AutoModel.from_pretrained`` /
                               ``AutoTokenizer``; ``learners.checkpoint.export.export_model``),
                               weights in two shards: model-trained.safetensors, and
                               model-frozen.safetensors, a hard link to the previous
                               checkpoint's when this store wrote one for the same
                               encoder (never rewritten, so no torn write reaches it)
    .tmp-<seq>-<pid>/          a checkpoint being written (or a crashed writer's)

``seq`` is this store's save counter (one more than the highest on disk), so
two checkpoints of the same model version never collide and the highest
``seq`` is the newest. A save has two halves: ``prepare`` serialises the
learner's state in memory and exports its encoder into the tmp folder while
the learner stands still (the short half); ``write`` does the slow disk
work and reads nothing of the learner, so it can run on another thread while
training goes on. A checkpoint is built in the tmp folder; a file whose bytes
equal the previous checkpoint's (written or restored by this store) is a hard
link to it, so frequent checkpoints write only what changed. Every file
and folder is fsynced, ``MANIFEST.json`` is written last and fsynced, then the
folder is renamed into place (the commit point) and ``state_dir`` is fsynced.
On load, a folder whose manifest is missing or invalid, or whose files do
not match it, is torn or corrupt: it is skipped with a WARNING and the
previous one is tried (``fallbacks`` counts them).

Everything a restarted learner needs is restored exactly, so a restored
learner publishes identical user and item vectors and goes on training where
the old one stopped (optimizer moments, EWC, replay buffer and RNG included).

One job per module:

``store``          ``CheckpointStore``: naming, saving, pruning, loading with fallbacks
``atomic``         writing a folder that appears complete or not at all (fsync, marker last, rename)
``manifest``       ``MANIFEST.json``: sizes and sha256s, verifying a folder against it
``collect``        what goes into a checkpoint: the learner's state as file contents, the HF model folder
``restore``        decoding the files and putting every part back into a learner
``compatibility``  settings a checkpoint cannot be loaded across (``MUST_MATCH``)

Everything public is re-exported here: ``from learners.checkpoint import ...`` keeps working.
"""

from learners.checkpoint.compatibility import LORA_MUST_MATCH, MUST_MATCH
from learners.checkpoint.manifest import FORMAT, MANIFEST, MODEL_DIR, REQUIRED
from learners.checkpoint.store import CheckpointStore, PreparedCheckpoint, checkpoint_version, complete_checkpoints

__all__ = ["CheckpointStore", "PreparedCheckpoint", "checkpoint_version", "complete_checkpoints", "FORMAT", "MANIFEST", "MODEL_DIR", "MUST_MATCH",
           "LORA_MUST_MATCH", "REQUIRED"]
