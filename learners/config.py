"""``LearnerConfig``: every learner setting, its one default and its help text.

The worker's ``Settings`` (``stream/config.py``) derives a ``--flag`` and a
``RECSTREAM_*`` variable from each field made with ``setting()``, so the
worker, ``recstream evaluate`` and ``recstream bench`` share these defaults
and cannot drift apart. Fields made with ``internal()`` are for code only
(evaluation strategies, tests). This module imports no torch: ``recstream
--help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional


def setting(default: Any, help: str, **bounds: float) -> Any:
    """A field that is also a setting; ``bounds`` (ge, gt, le, lt) are checked where settings are read."""
    return field(default=default, metadata={"help": help, "setting": True, "bounds": bounds})


def internal(default: Any, help: str) -> Any:
    """A field code sets (no flag): what an evaluation strategy or a test varies."""
    return field(default=default, metadata={"help": help, "setting": False})


@dataclass(frozen=True)
class LearnerConfig:
    model_path: str = field(metadata={"help": "local Hugging Face model folder", "setting": False})

    # --- the text encoder ----------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto, cpu or cuda")
    train_layers: int = setting(
        0, "top transformer layers fine-tuned; lower layers are frozen and cached; 0 = the encoder is frozen "
           "(cached text vectors) and only its projection heads train; the default, as fine-tuning a layer "
           "ranked lower on MovieLens and trained far slower (docs/evaluation.md)", ge=0)
    train_params: Literal["top", "lora", "full"] = setting(
        "top", "what of the encoder trains: top = the top --train-layers layers in full; lora = LoRA adapters "
               "(peft) on those layers only; full = every layer (embeddings frozen and cached; slow)")
    lora_rank: int = setting(8, "LoRA rank (--train-params lora)", ge=1)
    lora_alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank", gt=0)
    lora_targets: Optional[tuple[str, ...]] = setting(
        None, "comma-separated module names LoRA adapts (default per model family: query,value for BERT-style "
              "encoders, q_proj,v_proj for decoders)")
    gradient_checkpointing: bool = setting(
        False, "recompute the trainable layers' activations in backward (less memory, more compute)")
    max_text_tokens: int = setting(32, "tokens of item text the encoder reads", ge=4)
    vector_dim: int = setting(
        192, "size of published vectors: the learned model's part, --item-item-dims and one trending "
             "coordinate (--trending-weight)", ge=8)
    history_length: int = setting(
        256, "events kept per user: the user tower reads them, and the item-item fit learns from them "
             "which items go together (memory: about 16 bytes an event per user)", ge=1)

    # --- training ------------------------------------------------------------
    learning_rate: float = setting(2e-3, "Adam learning rate", gt=0)
    text_lr_scale: float = setting(1.0, "the encoder's trainable layers learn at --learning-rate times this", ge=0)
    batch_size: int = setting(128, "training minibatch (new events)", ge=1)
    negatives: int = setting(1024, "shared uniform negatives per minibatch", ge=1)
    temperature: float = setting(0.05, "softmax temperature of the training loss", gt=0)
    recency_decay: float = setting(
        0.97, "weight of a user's event shrinks by this per newer event", gt=0, le=1)
    popularity_weight: float = setting(
        0.5, "popularity prior: largest norm of the item vectors' popularity coordinates (log-scaled decayed "
             "event counts, one per rung); users learn their share; 0 = none", ge=0, lt=1)
    popularity_half_lives: str = setting(
        "0.25,1,4,16", "popularity rungs: half-lives as multiples of the catalogue size in events "
                       "(comma-separated; an all-time rung is added); users learn which they follow")
    user_tower: Literal["attention", "sum"] = setting(
        "sum", "sum = weighted sum of the user's recent items' context vectors; attention = causal "
               "self-attention over them (SASRec; ranked lower on MovieLens, docs/evaluation.md)")
    attention_heads: int = setting(2, "attention heads of the user tower", ge=1)
    in_batch_negatives: bool = setting(
        True, "also score each event against the minibatch's other items (log-Q corrected)")
    full_softmax: bool = setting(
        False, "score each event against every item of the catalogue instead of sampled negatives (then "
               "--negatives and --in-batch-negatives are unused); costs a pass over the catalogue per step")
    text_batch: int = setting(
        32, "distinct items per minibatch whose text runs through the trainable layers (the rest use cached "
            "outputs): bounds a step's cost when layers train; 0 = all", ge=0)
    serving_average: float = setting(
        0.97, "publish item vectors from a running average of the item side's weights (id table, text "
              "projection): the decay per optimizer step, about 1/(1-decay) steps of lag; it smooths the noise "
              "of single steps out of what rankers see; user vectors follow the live weights; 0 = items from "
              "the live weights too", ge=0, lt=1)
    ewc_lambda: float = setting(50.0, "EWC penalty strength", ge=0)
    ewc_decay: float = setting(0.9, "online EWC importance decay per experience", gt=0, le=1)
    replay_size: int = setting(100_000, "replay reservoir capacity (samples)", ge=0)
    replay_batch: int = setting(128, "replayed samples mixed into each minibatch", ge=0)
    refresh_per_update: int = setting(
        512, "items re-embedded per model update besides the trained ones (a rolling sweep of the catalogue "
             "keeps untrained items' text part current when layers train); the update -> item vectors time "
             "grows with it", ge=0)
    max_users: int = setting(1_000_000, "users kept in memory (least recently active evicted)", ge=1)
    item_item_dims: int = setting(
        64, "coordinates of the published vectors that carry closed-form item-item scores (EASE over the "
            "users' recent items, refit every tenth of the catalogue size in new events; learners.statistics.item_item); "
            "at most half of --vector-dim; 0 = none", ge=0)
    item_item_weight: float = setting(
        0.2, "starting weight of the item-item scores beside the model's cosine, relative to their spread; "
             "from then on chosen at each refit by how well each weight ranked the newest events", ge=0)
    item_item_recency: float = setting(
        0.995, "the item-item fit weighs each older event of a user this much less (counted in the user's "
               "own events): a longer memory than the user tower's --recency-decay, as which items go "
               "together changes more slowly than what one user wants next", gt=0, le=1)
    item_item_max_items: int = setting(
        4096, "the most active items that take part in the item-item fit (its cost grows with their number "
              "cubed; the rest rank by the model alone)", ge=2)
    trending_weight: float = setting(
        0.2, "what an item's value for items with few events adds to every user's score of it: how busy it "
             "is now (the shortest popularity rung, faded as the item gathers events), how strong its events "
             "are against the stream's and how new it is (learners.statistics.trending, learners.statistics.item_evidence); it "
             "ranks new and rarely seen items by what their own events say; 0 = none", ge=0)
    established_user_items: int = setting(
        10, "distinct items after which a user counts as established: an item keeps its share of the "
            "statistics every user shares (popularity rungs, trending coordinate) by how much of it came "
            "from established users against the stream's, and a user's repeat of an item is not counted "
            "again, so a burst of new accounts hammering a few items cannot take over everyone's top 10 "
            "(learners.statistics.credibility); the events still train the model and their own users' vectors; "
            "0 = every event counts in full", ge=0)
    seed: int = setting(0, "random seed")

    # --- set by code only ----------------------------------------------------
    strategy: str = internal("ewc_replay", "continual-learning strategy (learners.continual.strategy); evaluation varies it")
    epochs: int = internal(1, "passes over each experience")
    id_lr_scale: float = internal(1.0, "learning-rate multiplier of the id tables (an Adam group)")
    item_item_refit: float = internal(
        0.1, "the item-item head is refit after this many catalogue sizes of new events")
    item_item_time_share: float = internal(
        0.2, "at most this share of wall time goes to refitting the item-item head; 0 = no limit "
             "(evaluation: the cadence in events alone, so runs repeat exactly)")
    profile_length: int = internal(
        0, ">0: user vectors from a uniform sample of this many of the user's events (else the newest ones)")


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LearnerConfig) if f.metadata["setting"])
"""The ``LearnerConfig`` fields that are settings (flags of ``recstream worker`` and ``evaluate``)."""
