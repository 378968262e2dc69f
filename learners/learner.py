"""``ContinualRecommender``: the one learner the worker, evaluate and bench drive.

Small verbs: ``add_items`` (texts in), ``observe`` (an event in; cheap),
``learn`` (train one experience on what was observed), ``user_vectors`` /
``item_vectors`` (what gets published). Nothing here knows about Kafka.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from learners.statistics import trending
from learners.state.catalogue import Catalogue
from learners.statistics.credibility import event_credibility, suspected_counts
from learners.config import LearnerConfig  # re-exported: torch-free, so the CLI reads it without torch
from learners.encoder import TextEncoder, resolve_device
from learners.evaluation.event_rank import NO_RANK, event_ranks, ndcg_at_k, ndcg_full
from learners.continual.experience import make_experience
from learners.state.features import ItemFeatures
from learners.continual.guard import (CHECK_EVENTS, MIN_CHECK_EVENTS, UpdateCheck, UpdateUndo, model_items,
                            update_is_worse)
from learners.continual.hooks import StepCallbackPlugin
from learners.statistics.item_item import VALIDATION_SAMPLES, ItemItemHead, SharedFits, head_dims
from learners.towers.model import TwoTower
from learners.records import EVENT_TYPE_OF, EVENT_WEIGHTS, ITEM_ID_OF, USER_ID_OF, Event, Item, encoder_text
from learners.state.row_agreement import RowAgreement
from learners.continual.serving_average import SHARES, ServingAverage
from learners.continual.strategy import build_strategy
from learners.state.stream_state import StreamState
from learners.state.users import UserHistories, histories_by_id

log = logging.getLogger(__name__)

SHARE_SAMPLES = 256  # the newest events of an experience that choose the serving average's share


@dataclass(frozen=True)
class LearnReport:
    model_version: int
    samples: int
    seconds: float
    loss: float
    ewc_penalty: float
    touched_items: int
    steps: int = 0
    replay_samples: int = 0
    # Events counted at less than full weight on the shared statistics, by reason (learners.statistics.credibility).
    suspected: dict = field(default_factory=dict)


class ContinualRecommender:
    # The update guard (``guard_updates``): off until asked for.
    guard_tolerance: Optional[float] = None
    rollbacks = 0  # updates the guard undid
    _undo: Optional[UpdateUndo] = None
    _check: Optional[UpdateCheck] = None

    def __init__(self, config: LearnerConfig, encoder: Optional[TextEncoder] = None, collective=None,
                 shared_fits: Optional[SharedFits] = None) -> None:
        """``collective``: a ``learners.continual.distributed.Collective`` to train one model across ranks.
        ``shared_fits``: item-item fits shared with other learners that read the same stream."""
        torch.manual_seed(config.seed)
        self.config = config
        self.device = resolve_device(config.device)
        # Sharing an encoder (e.g. across evaluation strategies) shares its frozen cache.
        self.encoder = encoder or TextEncoder.from_config(config, self.device)
        # Own copy of the trainable top: several learners may share one encoder's frozen bottom.
        self.top = copy.deepcopy(self.encoder.top)
        self.features = ItemFeatures(self.encoder.hidden_size)
        self.catalogue = Catalogue()
        self.users = UserHistories(config.history_length, config.max_users, config.recency_decay,
                                   profile_length=config.profile_length)
        # The item-item head takes coordinates after the model's, the trending one the last. Fitted
        # per process on its own users, so not with a collective (ranks would publish different heads).
        dims = head_dims(config.vector_dim, config.item_item_dims) if collective is None else 0
        self.item_item = ItemItemHead(dims, config.item_item_weight, max_items=config.item_item_max_items,
                                      seed=config.seed,
                                      refit=config.item_item_refit,
                                      time_share=config.item_item_time_share,
                                      recency=config.item_item_recency,
                                      history_recency=config.recency_decay) if dims else None
        self._shared_fits = shared_fits
        self.trending = trending.TrendingCoordinate(config.trending_weight)
        self.model = TwoTower(self.top, self.features, self.encoder.hidden_size,
                              config.vector_dim - dims - trending.DIMS,
                              config.negatives, config.temperature, self.device,
                              text_batch=config.text_batch, popularity_weight=config.popularity_weight,
                              popularity_half_lives=config.popularity_half_lives, user_tower=config.user_tower,
                              history_length=config.history_length, heads=config.attention_heads,
                              in_batch_negatives=config.in_batch_negatives,
                              full_softmax=config.full_softmax).to(self.device)
        self._step_hook = StepCallbackPlugin()
        self.average = ServingAverage(self.model, config.serving_average, names=TwoTower.item_side_params) \
            if config.serving_average > 0 else None
        self.parts = build_strategy(
            config.strategy, self.model, lr=config.learning_rate, batch_size=config.batch_size,
            epochs=config.epochs, ewc_lambda=config.ewc_lambda, ewc_decay=config.ewc_decay,
            replay_size=config.replay_size, replay_batch=config.replay_batch, device=self.device,
            extra_plugins=(self._step_hook,) + self._rounds_plugin(collective)
            + ((self.average,) if self.average else ()), id_lr_scale=config.id_lr_scale,
            text_lr_scale=config.text_lr_scale)
        if collective is not None:
            # Avalanche's distributed check is about its own DDP path (DistributedHelper.wrap_model), which
            # is not used here (CollectiveRoundsPlugin reduces the gradients): it would list every plugin
            # as unsupported on stderr.
            self.parts.strategy._distributed_check = True  # noqa: SLF001 - skips that check, see above
        self.model_version = 0
        self._seq = 0
        self._pending: list[tuple[int, int, int]] = []  # (user slot, event seq, item row)
        self.samples_shed = 0
        self._refresh_cursor = 0
        self._item_table = np.zeros((0, config.vector_dim), np.float32)
        # What publishing reads: the user tower's per-item tables and a copy of the tower, both
        # as of the last model update (training changes the live tower on its own thread).
        self._user_tables: dict[str, torch.Tensor] = {}
        self._serving_tower = self._tower_copy()
        self._published = np.zeros((0, config.vector_dim), np.float32)
        self._tables_stale = True
        # Training on another thread (stream.worker's background training): ``lock`` guards
        # what the caller's thread reads and writes between experiences -- users, catalogue,
        # pending samples, vector tables. ``learn()`` holds it only to take its samples and
        # to land the update; the optimizer steps and the re-embedding run without it, with
        # ``training_in_flight`` set so ``_tables()`` leaves the model alone meanwhile. The
        # caller must not ``add_items`` while training is in flight (that runs the model).
        self.lock = threading.RLock()
        self.training_in_flight = False

    def _rounds_plugin(self, collective) -> tuple:
        # Before the serving average and EWC, so both see the group's reduced gradients.
        self.collective = collective
        self.rows: Optional[RowAgreement] = None if collective is None else RowAgreement()
        if collective is None:
            return ()
        from learners.continual.distributed import CollectiveRoundsPlugin
        return (CollectiveRoundsPlugin(collective, self.config.history_length),)

    # -- items ----------------------------------------------------------------
    def add_items(self, items: Sequence[Item], frozen_cache: Optional[dict] = None) -> list[str]:
        """Store texts; encode new or changed ones. Returns the ids whose text changed.

        Texts are stored only once all of them are encoded: a call that raises changes no text.
        With a collective, texts of ids without a row wait for ``agree_rows``."""
        if self.rows is not None:
            items = self.rows.admit_items(items, self.catalogue)
        newest = {item.item_id: encoder_text(item) for item in items}  # the last of repeated ids wins
        changed_rows, texts = [], []
        for item_id, text in newest.items():
            row = self.catalogue.row(item_id)
            if self.catalogue.texts[row] != text:
                changed_rows.append(row)
                texts.append(text)
        self.features.ensure_rows(len(self.catalogue))
        if changed_rows:
            cached = [frozen_cache.get(t) if frozen_cache is not None else None for t in texts]
            missing = [i for i, c in enumerate(cached) if c is None]
            if missing:
                fresh = self.encoder.frozen_features([texts[i] for i in missing])
                for i, feature in zip(missing, fresh):
                    cached[i] = feature
                    if frozen_cache is not None:
                        frozen_cache[texts[i]] = feature
            for row, feature in zip(changed_rows, cached):
                self.features.set_frozen(row, feature)
            self._refresh_pooled(torch.tensor(changed_rows))
            for row, text in zip(changed_rows, texts):
                self.catalogue.set_text(self.catalogue.ids[row], text)
        self._tables_stale = True
        return [self.catalogue.ids[r] for r in changed_rows]

    @torch.no_grad()
    def _refresh_pooled(self, rows: torch.Tensor, chunk: int = 512) -> None:
        """Run the trainable top over cached bottom features of ``rows``."""
        rows = self.features.rows_with_text(rows)
        self.model.eval()
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            pooled = self.top([self.features.frozen[r] for r in part.tolist()], self.device)
            self.features.pooled[part] = pooled.float().cpu()
        self.model.train()

    # -- events ---------------------------------------------------------------
    def observe(self, event: Event) -> None:
        """Apply one valid event to the user's history and queue it for training."""
        self.observe_many((event,))

    def observe_many(self, events: Sequence[Event]) -> None:
        """``observe`` for a batch of valid events, in order (the worker's ingest path). With a
        collective, events naming ids without a row (and the user's later ones) wait for ``agree_rows``."""
        if self.rows is not None:
            events = self.rows.admit_events(events, self.catalogue)
        if not events:
            return
        rows = list(map(self.catalogue.row, map(ITEM_ID_OF, events)))
        first = self._seq
        slots = self.users.append_many(list(map(USER_ID_OF, events)), rows,
                                       list(map(EVENT_WEIGHTS.__getitem__, map(EVENT_TYPE_OF, events))), first)
        self._pending.extend(zip(slots, range(first, first + len(events)), rows))
        self._seq = first + len(events)

    def agree_rows(self) -> list[str]:
        """With a collective (every rank calls it, together): rows for the ids any rank saw since
        the last call, in one order, then what waited for them applied; returns the users whose
        events were applied now. ``learn`` calls it first."""
        if self.rows is None:
            return []
        with self.lock:
            items, events = self.rows.agree(self.collective, self.catalogue)
            if items:
                self.add_items(items)
            self.observe_many(events)
        return list(dict.fromkeys(map(USER_ID_OF, events)))

    # -- users moving between learners (their events partition changed owner) ---
    def export_histories(self, user_ids: Iterable[str]) -> dict[str, tuple[list[str], list[float]]]:
        """Each held user's history as item ids and event weights, oldest first: what another
        learner needs to carry on with them (``adopt_histories``). Users not held are left out."""
        with self.lock:
            return histories_by_id(self.users.state(), self.catalogue.ids, user_ids)

    def adopt_histories(self, histories: dict[str, tuple[Sequence[str], Sequence[float]]]) -> int:
        """Start these users' histories over from the given ones (another learner's
        ``export_histories``). They queue no training samples: those events were trained on
        where they were applied. With a collective, items without an agreed row are left out
        (rows are only handed out in rounds). Returns how many users were adopted."""
        with self.lock:
            for user_id, (item_ids, weights) in histories.items():
                if self.rows is None:
                    rows = [self.catalogue.row(item_id) for item_id in item_ids]
                else:
                    kept = [(self.catalogue.existing_row(i), w) for i, w in zip(item_ids, weights)]
                    kept = [(row, w) for row, w in kept if row is not None]
                    rows, weights = [row for row, _ in kept], [w for _, w in kept]
                self.users.replace(user_id, rows, weights, self._seq)
                self._seq += len(rows)
        return len(histories)

    @property
    def rows_waiting(self) -> bool:
        """Ids wait for an ``agree_rows`` round (always False without a collective)."""
        return self.rows is not None and self.rows.waiting

    def on_step(self, callback: Optional[Callable[[], None]]) -> None:
        """Call ``callback`` after every optimizer step (e.g. to keep a Kafka consumer alive)."""
        self._step_hook.callback = callback

    @property
    def pending(self) -> int:
        return len(self._pending)

    def snapshot(self) -> StreamState:
        """A copy of the stream state (the caller holds ``lock`` if another thread observes)."""
        return StreamState(int(self.model_version), int(self._seq), list(self._pending),
                           np.array(self._published, np.float32, copy=True), int(self._refresh_cursor),
                           int(self.samples_shed))

    def restore(self, state: StreamState) -> None:
        """Put back a stream state taken by ``snapshot`` (vector tables are rebuilt on next use)."""
        self.model_version = int(state.model_version)
        self._seq = int(state.event_seq)
        self._pending = [tuple(int(v) for v in sample) for sample in state.pending]
        self._published = np.array(state.published, np.float32, copy=True)
        self._refresh_cursor = int(state.refresh_cursor)
        self.samples_shed = int(state.samples_shed)
        self._tables_stale = True

    def learn(self, max_samples: Optional[int] = None) -> Optional[LearnReport]:
        """Train one experience on everything observed since the last call.

        With ``max_samples``, only the oldest that many; the rest stays pending.
        """
        with self.lock:
            if self._check is not None and self._pending:  # judged before these events train
                self._settle_check(final=True)
            if self.collective is not None:
                self.agree_rows()  # the id tables grow alike on every rank
            limit = len(self._pending) if max_samples is None else max_samples
            if self.collective is not None:  # every rank joins the round if any has samples
                if self.collective.max_int(min(limit, len(self._pending))) == 0:
                    return None
                if not self._pending:
                    empty = np.zeros((0, self.config.history_length))
                    return self._train(empty.astype(np.int64), empty.astype(np.float32), np.zeros(0, np.int64))
            if not self._pending:
                return None
            pending, self._pending = self._pending[:limit], self._pending[limit:]
            slots, seqs, items = (np.array(col, dtype=np.int64) for col in zip(*pending))
            hist_rows, hist_weights = self.users.histories(slots, before_seq=seqs)
            owners = self.users.owner_tags(slots)
            event_weights = self.users.weights_at(slots, seqs)
        return self._train(hist_rows, hist_weights, items, owners, event_weights)

    def drop_pending(self, slot: int) -> int:
        """Drop the samples waiting for training of the user in ``slot`` (erasure); returns how many."""
        kept = [sample for sample in self._pending if sample[0] != slot]
        dropped = len(self._pending) - len(kept)
        self._pending = kept
        return dropped

    def shed_pending(self, keep: int) -> int:
        """Keep a uniform sample of ``keep`` pending samples (training overload).

        The shed events already updated user state and vectors; only their
        gradient step is skipped. Returns how many were shed.
        """
        surplus = len(self._pending) - keep
        if surplus <= 0:
            return 0
        chosen = sorted(random.Random(self._seq).sample(range(len(self._pending)), keep))
        self._pending = [self._pending[i] for i in chosen]
        self.samples_shed += surplus
        return surplus

    def _train(self, hist_rows: np.ndarray, hist_weights: np.ndarray, items: np.ndarray,
               owners: Optional[np.ndarray] = None, event_weights: Optional[np.ndarray] = None) -> LearnReport:
        with self.lock:
            self.features.ensure_rows(len(self.catalogue))
            self.model.grow(len(self.catalogue))
            served = check = None
            if self._undo is not None:  # the version this update replaces, as it is served
                self._tables()
                served = self._served()
            self.training_in_flight = True
            head = self.item_item
            # The head's input, copied while the caller's thread cannot change the histories.
            refit = (self.users.histories_of(self.users.user_ids()), len(self.catalogue), self._seq) \
                if head is not None and head.due(self._seq, len(self.catalogue)) else None
        updated, factors = False, None
        try:  # model-side work only from here: no lock, see __init__
            if refit is not None and head.active:  # before training on them: events neither part has seen
                self._weigh_item_item(hist_rows, hist_weights, items)
            if self.average is not None and self.average.shadow and self.collective is None:
                self._choose_serving_share(hist_rows, hist_weights, items)  # before training on them too
            experience = make_experience(hist_rows, hist_weights, items, self.model_version, owners)
            stats = self.parts.stats
            samples_before, seconds_before, steps_before = stats.samples, stats.seconds, stats.steps
            if served is not None:
                self._undo.begin(self.parts.strategy.optimizer)
            self.parts.strategy.train(experience, eval_streams=[])
            item_rows = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
            sample_weights = torch.from_numpy(np.full(len(items), np.nan) if event_weights is None
                                              else np.asarray(event_weights, np.float64))
            credibility = event_credibility(hist_rows, hist_weights, items, self.config.established_user_items)
            suspected = suspected_counts(credibility)
            per_event = torch.stack([sample_weights, *map(torch.from_numpy, credibility)], 1)
            if self.collective is not None:  # popularity and re-embedding see the group's items
                item_rows, per_event = self.collective.gather_rows(item_rows, per_event)
                items = item_rows.numpy()
                trained = torch.tensor(sorted(self.model.text_trained), dtype=torch.long)
                self.model.text_trained.update(self.collective.gather_rows(trained).tolist())
            touched = np.unique(items)
            self.model.observe_popularity(item_rows, *per_event.T)  # event weights, counted, established
            if served is not None:  # what the re-embedding covers, to cover it again after an undo
                check = UpdateCheck(self.model_version + 1, served, self._refresh_cursor,
                                     list(self.model.text_trained), touched, stats.steps > steps_before)
            self._refresh_after_update(touched)
            if refit is not None:
                (rows, weights), n_items, events_seen = refit
                factors = head.fit(rows, weights, n_items, events_seen) if self._shared_fits is None \
                    else self._shared_fits.fit(head, rows, weights, n_items, events_seen)
            updated = True
        finally:
            with self.lock:  # the update lands: new version, tables rebuilt on next use
                self.training_in_flight = False
                self._tables_stale = True
                if updated:
                    if factors is not None:
                        head.install(factors, events_seen)
                    self.model_version += 1
                    if check is not None:
                        self._check = check
                        self._settle_check(final=False)  # now if events came in while it trained
                elif served is not None:
                    self._undo.discard()
        penalty = self.parts.ewc.last_penalty if self.parts.ewc else 0.0
        loss = float(np.mean(stats.losses)) if stats.losses else float("nan")
        replay = self.parts.replay
        replayed = replay.storage_policy.filled if replay is not None else 0
        return LearnReport(self.model_version, stats.samples - samples_before, stats.seconds - seconds_before,
                           loss, penalty, len(touched), stats.steps - steps_before, replayed, suspected)

    # -- guarded updates ------------------------------------------------------------
    def guard_updates(self, tolerance: float) -> None:
        """Judge every update on the newest events it has not trained on (those that arrived while
        it trained, else those observed before the next one trains), against the version it
        replaced, and undo it when its own vectors rank them worse by more than ``tolerance``
        (relative NDCG over the whole catalogue): weights, optimizer, EWC and serving average go
        back, the events stay applied, and the next version number names the vectors. Not with a
        collective (every rank would have to agree on every undo)."""
        if self.collective is not None:
            return
        self.guard_tolerance = tolerance
        if self._undo is None:
            strategy = self.parts.strategy
            self._undo = UpdateUndo(self.model, lambda: strategy.optimized_param_id, self.parts.ewc, self.average)
            strategy.plugins.append(self._undo)

    def _served(self) -> tuple:
        """The tables served now (``_tables`` replaces them, never changes them in place)."""
        return self._item_table, self._user_tables, self._serving_tower

    def _model_users(self, served: tuple, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The model's own user vectors (no item-item or trending part) with a version's tables."""
        _, tables, tower = served
        tables = tables or {"ctx": torch.zeros(0, self.model.ctx_dim)}
        need = int(rows.max()) + 1 if rows.size else 0
        tables = {k: torch.cat([t, t.new_zeros(need - len(t), t.shape[1])]) if len(t) < need else t
                  for k, t in tables.items()}  # items newer than that version: zero rows, as served then
        with torch.no_grad():
            out = tower.read(tables, torch.from_numpy(np.ascontiguousarray(rows, np.int64)),
                             torch.from_numpy(np.ascontiguousarray(weights, np.float32)))
        return self.model.finish_users(out).numpy()

    def _settle_check(self, final: bool) -> None:
        """Judge the update ``_check`` names on the newest pending events (caller holds ``lock``).
        Too few of them: wait for more unless ``final``, when the update stands."""
        check = self._check
        if check.version != self.model_version:  # a checkpoint was restored since: nothing to judge
            self._check = None
            self._undo.discard()
            return
        newest = self._pending[-CHECK_EVENTS:]
        if not newest and not final:
            return
        slots, seqs, items = (np.array(col, dtype=np.int64) for col in zip(*newest)) if newest else \
            (np.zeros(0, np.int64),) * 3
        rows, weights = self.users.histories(slots, before_seq=seqs)
        old_items = check.served[0]
        self._tables()
        dim = self.model.out_dim
        old = event_ranks(self._model_users(check.served, rows, weights), model_items(old_items, dim),
                          items, rows, weights)
        new = event_ranks(self._model_users(self._served(), rows, weights),
                          model_items(self._item_table[:len(old_items)], dim), items, rows, weights)
        tested = old >= 0
        if tested.sum() < MIN_CHECK_EVENTS and not final:
            return
        self._check = None
        before, after = ndcg_full(old[tested]), ndcg_full(new[tested])
        if tested.sum() < MIN_CHECK_EVENTS or not update_is_worse(before, after, self.guard_tolerance):
            self._undo.discard()
            return
        self._undo.undo(check.ewc_folded)
        self._refresh_cursor = check.refresh_cursor  # the same texts re-embedded, by the restored top
        self.model.text_trained.update(check.text_trained)
        self._refresh_after_update(check.touched)
        self.rollbacks += 1
        self.model_version += 1  # the restored weights' vectors go out under a version of their own
        self._tables_stale = True
        log.warning("model version %d undone: on the %d newest events it had not trained on it ranks worse "
                    "than the version it replaced (NDCG %.4f against %.4f, more than %.0f%% lower); the "
                    "previous weights serve again as version %d", check.version, int(tested.sum()), after.mean(),
                    before.mean(), 100 * self.guard_tolerance, self.model_version)

    @torch.no_grad()
    def _weigh_item_item(self, hist_rows: np.ndarray, hist_weights: np.ndarray, items: np.ndarray) -> None:
        """Let the item-item head choose its weight on this experience's events (model side only)."""
        pick = slice(-VALIDATION_SAMPLES, None)  # the newest: a bounded cost per refit
        rows = torch.from_numpy(np.ascontiguousarray(hist_rows[pick], np.int64)).to(self.device)
        weights = torch.from_numpy(np.ascontiguousarray(hist_weights[pick], np.float32)).to(self.device)
        self.model.eval()
        with self.average.applied() if self.average else contextlib.nullcontext():
            model_items = self.model.item_table().float().cpu().numpy()
        model_users = self.model.user_vectors(rows, weights).float().cpu().numpy()
        self.model.train()
        self.item_item.weigh(model_users, model_items, hist_rows[pick], hist_weights[pick], items[pick])

    @torch.no_grad()
    def _choose_serving_share(self, hist_rows: np.ndarray, hist_weights: np.ndarray, items: np.ndarray) -> None:
        """Let the serving average choose how much of it is published, by how each share ranks
        this experience's newest events, which nothing has trained on yet (model side only)."""
        pick = slice(-SHARE_SAMPLES, None)
        rows = torch.from_numpy(np.ascontiguousarray(hist_rows[pick], np.int64)).to(self.device)
        weights = torch.from_numpy(np.ascontiguousarray(hist_weights[pick], np.float32)).to(self.device)
        self.model.eval()
        users = self.model.user_vectors(rows, weights).float().cpu().numpy()
        gains = []
        for share in SHARES:
            with self.average.applied(share):
                table = self.model.item_table().float().cpu().numpy()
            ranks = event_ranks(users, table, items[pick], hist_rows[pick], hist_weights[pick])
            gains.append(float(ndcg_at_k(ranks[ranks != NO_RANK]).mean()) if (ranks != NO_RANK).any() else 0.0)
        self.model.train()
        # One reading of the stream for both: where the live weights rank the newest events better
        # than the lagging average, tastes are moving on, and replaying old ones would hold them back.
        share = self.average.choose(gains)
        if self.parts.replay is not None:
            self.parts.replay.strength = share

    def _refresh_after_update(self, touched: np.ndarray) -> None:
        """Re-embed trained items plus a rolling slice of the catalogue."""
        if self.model.top.trainable:
            n = min(len(self.catalogue), len(self.features))  # items first seen mid-training have no text yet
            sweep = min(self.config.refresh_per_update, n)
            start = self._refresh_cursor % max(n, 1)
            sweep_rows = (np.arange(start, start + sweep) % max(n, 1)) if n else np.zeros(0, np.int64)
            self._refresh_cursor = start + sweep
            trained = np.fromiter(self.model.text_trained, np.int64, len(self.model.text_trained))
            self.model.text_trained.clear()
            rows = np.unique(np.concatenate([trained, sweep_rows]))
            self._refresh_pooled(torch.from_numpy(rows))
        self._tables_stale = True

    # -- vectors --------------------------------------------------------------
    def _tower_copy(self) -> torch.nn.Module:
        tower = copy.deepcopy(self.model.tower).eval()
        tower.requires_grad_(False)
        return tower

    def _tables(self) -> None:
        with self.lock:
            if not self._tables_stale and len(self._item_table) == len(self.catalogue):
                return
            if self.training_in_flight:
                # The model is mid-update on the training thread: keep the last tables. Items
                # first seen since then get zero rows until the update lands.
                missing = len(self.catalogue) - len(self._user_tables.get("ctx", ()))
                if missing > 0 and self._user_tables:
                    self._user_tables = {k: torch.cat([t, t.new_zeros(missing, t.shape[1])])
                                         for k, t in self._user_tables.items()}
                return
            self.features.ensure_rows(len(self.catalogue))
            self.model.grow(len(self.catalogue))
            self._serving_tower = self._tower_copy()
            if not len(self.catalogue):  # nothing seen yet: no item rows to run the towers on
                self._item_table = np.zeros((0, self.config.vector_dim), np.float32)
                self._user_tables = {}
                self._tables_stale = False
                return
            self.model.eval()
            with self.average.applied() if self.average else contextlib.nullcontext():
                table = self.model.item_table().float().cpu().numpy()
                if self.item_item is not None:
                    table = self.item_item.items(table, np.arange(len(table)))
                values = trending.item_value(self.model.rising(trending.EVIDENCE).cpu().numpy(),
                                             self.model.conversion().cpu().numpy(),
                                             (self.model.newness() * self.model.discount()).cpu().numpy())
                self._item_table = self.trending.items(table, values)
                self._user_tables = {k: t.detach().float().cpu() for k, t in self.model.user_tables().items()}
            self.model.train()
            self._tables_stale = False

    def item_vectors(self, item_ids: Optional[Iterable[str]] = None) -> np.ndarray:
        self._tables()
        if item_ids is None:
            return self._item_table
        rows = self.catalogue.rows(item_ids)
        self._tables()  # rows may have grown the catalogue
        return self._item_table[rows]

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.user_vectors_from(*self.users.histories_of(user_ids))

    def user_histories(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """What these users' vectors are made of now: (item rows, weights), [users, length], arrays
        of their own (``user_vectors_from`` reads them)."""
        return self.users.histories_of(user_ids)

    def user_vectors_from(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """User vectors of given histories (from ``user_histories``) with the current model."""
        self._tables()
        rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        weights = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        tables = self._user_tables or {"ctx": torch.zeros(0, self.model.ctx_dim)}
        with torch.no_grad():
            out = self._serving_tower.read(tables, rows, weights)
        vectors = self.model.finish_users(out).numpy()
        if self.item_item is not None:
            vectors = self.item_item.users(vectors, rows.numpy(), weights.numpy())
        return self.trending.users(vectors)

    def items_to_publish(self, min_change: float = 0.0) -> tuple[list[str], np.ndarray]:
        """Items never published or whose vector moved by more than ``min_change`` (1 - cosine)."""
        table = self.item_vectors()
        n, seen = len(table), len(self._published)
        if seen < n:
            self._published = np.concatenate([self._published, np.zeros((n - seen, table.shape[1]), np.float32)])
        moved = 1.0 - np.einsum("nd,nd->n", table, self._published) > min_change
        rows = np.flatnonzero(moved)
        self._published[rows] = table[rows]
        return [self.catalogue.ids[r] for r in rows], table[rows]

    def config_dict(self) -> dict:
        return asdict(self.config)
