"""The constrained optimizer: fine-tune so the target improves while every protected constraint holds.

The loop is the same for every method (``optimize.method``); what differs between them, the store term,
the constraint weights and wise-ft's run of its own, is a class of :mod:`.methods`, all fed the same plan
and the same batches.

The old model's per-sample losses on the store are computed once and cached by digest. Checkpoint
selection uses the validation split only (the held-out split belongs to the certificate). The whole
training state is saved atomically every ``checkpoint_every`` steps, and a resumed run ends bit-identical
to an uninterrupted one on CPU. The hot loop never synchronises with the device except when it logs.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..certify.selection import Assessment, Capability, Selector
from ..data import ProtectedSampler, TargetSampler
from ..distributed import context as dist_context
from ..errors import RunError, atomic_write_text
from ..evaluate import (
    PAIRED_METRICS,
    PredictionCache,
    Predictions,
    evaluate,
    feature_key,
    image_features,
    kl_from_old,
    logits_losses,
    margin_drops,
    metric_values,
    prediction_key,
    visual_digest,
)
from ..model import build_class_tokens, model_autocast
from ..plan import Plan
from ..progress import Progress
from . import state
from .candidates import Candidates
from .data import Split, TrainData, TrainOutcome
from .methods import REGISTRY, Method
from .methods import build as build_method
from .objective import Contrastive, CrossEntropy, Objective
from .schedule import lr_factor
from .towers import _cpu_state, _index, _Towers
from .validation import constraint_values, validation_drops
from .weights import focal_weights


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One training run of one method. Build it, then :meth:`run`; state lives in plain attributes so
    that :meth:`state_dict` captures all of it for resume."""

    def __init__(
        self,
        plan: Plan,
        loaded,
        data: TrainData,
        *,
        method: str | None = None,
        run_dir: Path | None = None,
        cache: PredictionCache | None = None,
        quiet: bool = False,
        log: Callable[[str], None] | None = None,
        tag: str | None = None,
    ):

        self.plan, self.o = plan, plan.optimizer
        self.method = method or self.o.method
        if self.method not in REGISTRY:
            raise RunError(f"optimize.method: unknown method {self.method!r}; expected one of {', '.join(REGISTRY)}")
        self.loaded, self.model, self.data = loaded, loaded.model, data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cache = cache or PredictionCache()
        self.quiet = quiet
        self.log = log or (lambda s: None)
        self.tag = tag or self.method
        self.device = next(self.model.parameters()).device
        self.dist = dist_context()
        self.autocast = functools.partial(model_autocast, self.device, plan.model.precision)
        self.tau = self.o.constraint_tau

        self._init_constraints()
        # what differs between methods (train.methods): the store term, the constraint weights, a run of its own
        self.formulation: Method = build_method(self.method, self.o, len(self.constraints), self.device)
        self.class_tokens = build_class_tokens(loaded.tokenizer, plan.classes, plan.templates).to(self.device)
        self.prompt_tokens, self.prompt_heads = self.model.class_prompts(self.class_tokens)
        self.old_state = _cpu_state(self.model)
        self.old_digest = loaded.digest

        self._init_features()
        self._init_references()
        self._init_samplers()
        self._init_optimizer()

    def _init_constraints(self) -> None:
        """Which capability each class belongs to, and the constraints' slacks and metric."""
        plan = self.plan
        C = len(plan.classes)
        self.constraints = plan.constraints
        cap = np.full(C, -1, dtype=np.int64)
        for k, c in enumerate(self.constraints):
            cap[list(c.class_indices)] = k
        self.cap_of_class = torch.as_tensor(cap, device=self.device)
        self.slack = torch.tensor([c.slack for c in self.constraints], device=self.device)
        self.metric = self.constraints[0].metric
        if any(c.metric != self.metric for c in self.constraints):
            raise RunError("protect[*].constraint.metric: all capabilities must use the same metric in one run")

    def _init_features(self) -> None:
        """Cached image features of a frozen (or target-tower) shared image tower."""
        plan, data = self.plan, self.data
        # a frozen image tower sees every image once: its features for the store, the target set and
        # validation are computed (or read from the cache, keyed by the tower's digest) before training
        # model.target_tower: the target's own image tower is the only part that trains (added below, after
        # the old model's references), so the shared tower's features are cached like a frozen tower's
        self.target_tower = plan.model.target_tower and self.formulation.adds_target_tower
        self.image_frozen = "image" in plan.model.freeze or plan.model.target_tower
        self._features: dict[int, torch.Tensor] = {}
        if self.image_frozen:
            vis = visual_digest(self.model)
            for split in (data.store, data.target, data.validation):
                key = feature_key(vis, split.digest, plan.model.precision)
                feats = self.cache.features(
                    key,
                    functools.partial(
                        image_features, self.model, split.bank, device=self.device, autocast=self.autocast
                    ),
                )
                self._features[id(split)] = feats.to(self.device)

    def _init_references(self) -> None:
        """The old model's references (store metric, validation predictions) and the selector."""
        plan, data = self.plan, self.data
        C = len(plan.classes)
        # the old model's references: per-sample metric on the store, predictions on validation
        # ('distill': the old model's class log-probabilities of every store image, N x C, instead)
        self.distill = self.metric in ("distill", "focal-distill")
        # the target's decision offset, chosen on validation at every evaluation (constrained methods only)
        self.calibrate = bool(self.o.calibrate.target_offset) and self.formulation.constrained
        self.per_rival = self.calibrate and self.o.calibrate.per_rival  # the offset grown per rival class
        self.ref_store = self._reference(data.store, log_probs=self.distill)
        # (calibration reads the old model's validation logits too: cached with the reference, not re-run)
        self.ref_val = self._reference(data.validation, log_probs=True)
        # selection compares every candidate's validation logits with the old model's (safespec.certify.selection)
        counts = data.heldout_counts
        if counts is None:
            counts = np.bincount(data.validation.labels, minlength=C)
        ref_val_logp = self.ref_val.log_probs
        assert ref_val_logp is not None  # asked for above
        self.selector = Selector(
            ref_val_logp,
            data.validation.labels,
            [
                Capability(
                    c.name,
                    tuple(c.class_indices),
                    c.tolerance,
                    c.confidence,
                    int(np.asarray(counts)[list(c.class_indices)].sum()),
                    plan.certify.test,
                )
                for c in self.constraints
            ],
            plan.objective.target_index,
            self.o.select.min_certify_probability,
        )
        if self.metric in PAIRED_METRICS:
            if self.distill:
                self.ref_store_logp = torch.as_tensor(self.ref_store.log_probs, device=self.device)
            else:  # 'margin': the old model's losses give its soft margins
                self.ref_store_losses = torch.as_tensor(self.ref_store.losses, device=self.device)
            # focal distillation weighs each image's value by whether the old model got it right
            self.store_focal = torch.as_tensor(focal_weights(self.ref_store.correct, self.metric), device=self.device)
            self.ref_store_metric = torch.zeros(len(data.store.labels), device=self.device)  # old against old
        else:
            self.ref_store_metric = torch.as_tensor(
                metric_values(self.ref_store.losses, self.ref_store.margins, self.metric), device=self.device
            )

    def _init_samplers(self) -> None:
        """The step's samplers, labels on the device and (contrastive objective) caption state."""
        plan, data, loaded = self.plan, self.data, self.loaded
        # samplers: store rows of protected classes only; target rows split into positives/negatives
        protected = sorted({i for c in self.constraints for i in c.class_indices})
        self.prot_sampler = ProtectedSampler(
            data.store.labels,
            protected,
            self.o.batch.protected_classes,
            self.o.batch.per_class,
            seed=self.o.seed,
            class_names=plan.classes,
        )
        self.target_sampler = TargetSampler(
            data.target.labels,
            plan.objective.target_index,
            self.o.batch.target,
            self.o.batch.positive_fraction,
            seed=self.o.seed + 1,
        )
        self.target_labels = torch.as_tensor(data.target.labels, device=self.device)
        self.store_labels = torch.as_tensor(data.store.labels, device=self.device)
        self.caption_tokens = None
        if plan.objective.kind == "contrastive":
            caps = data.target.captions or [None] * len(data.target.labels)
            default = plan.templates[0]
            texts = [c if c else default.format(plan.classes[y]) for c, y in zip(caps, data.target.labels)]
            self.caption_tokens = loaded.tokenizer(texts).to(self.device)
        t = plan.objective.target_index
        self.objective: Objective = (
            Contrastive(self.o.temperature, t, len(data.target.labels), self.o.gamma, self.device)
            if self.caption_tokens is not None
            else CrossEntropy(self.o.temperature, t)
        )

    def _init_optimizer(self) -> None:
        """Constraint weights, the target's tower, frozen parts, cached text inputs, the optimizer."""
        plan = self.plan
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0

        if self.target_tower:
            self.model.add_class_tower(plan.objective.target_index).to(self.device)
        self._freeze(plan.model.freeze)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RunError("model.freeze: every parameter is frozen; enable heads or train a tower")
        self.towers = self.dist.wrap(_Towers(self.model), self.device)
        # a frozen text tower: the prompts' and captions' pooled features before the projection never
        # change, so they are computed once; a step then runs only the projection and the heads, and its
        # cost no longer grows with the number of classes' prompts
        self.text_frozen = "text" in plan.model.freeze or self.target_tower
        self.prompt_inputs, self.caption_inputs = self.prompt_tokens, self.caption_tokens
        self._prompt_tree: tuple[tuple[int, int], Any] | None = None
        if self.text_frozen:
            with torch.no_grad(), self.autocast():
                self.prompt_inputs = self.model.text_hidden(self.prompt_tokens)
                if self.caption_tokens is not None:
                    self.caption_inputs = self.model.text_hidden(self.caption_tokens)
        # with a target tower nothing on the text side trains: the class text features are computed once
        self.fixed_text = None
        if self.target_tower:
            with torch.no_grad(), self.autocast():
                txt = F.normalize(self.model.project_text(self.prompt_inputs, self.prompt_heads), dim=-1)
                self.fixed_text = self.model.pool_templates(txt, len(plan.classes)).float()
        # fused AdamW: one kernel over all parameters (CPU and CUDA); on a 2-core CPU the per-parameter loop
        # of the default implementation costs as much as the forward pass of a tiny model
        self.opt = torch.optim.AdamW(params, lr=self.o.lr, weight_decay=self.o.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.o.warmup_steps, self.o.steps)
        )
        self.step = 0
        self.trajectory: list[dict] = []
        self.candidates = Candidates(self.o.select.min_certify_probability)
        self.seconds = 0.0

    def _freeze(self, towers) -> None:
        """Keep the named towers fixed ('image': the vision tower; 'text': the shared text tower, its
        projection included); task-dependent heads always train. With ``model.target_tower`` the target's
        image tower is the only part that trains; other classes' towers (from earlier cycles) are kept."""
        own = str(self.plan.objective.target_index)
        for key, tower in self.model.class_towers.items():
            tower.requires_grad_(self.target_tower and key == own)
        if self.target_tower:
            for p in [*self.model.clip.parameters(), *(self.model.heads.parameters() if self.model.heads else [])]:
                p.requires_grad_(False)
            return
        clip = self.model.clip
        for name, p in clip.named_parameters():
            is_image = name.startswith("visual.")
            if (is_image and "image" in towers) or (not is_image and "text" in towers):
                p.requires_grad_(False)
        for name in ("logit_scale", "logit_bias"):  # unused: the plan's tau sets the logits' temperature
            p = getattr(clip, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(False)

    # ------------------------------------------------------------------ references and evaluation
    def _reference(self, split: Split, *, log_probs: bool) -> Predictions:
        key = prediction_key(
            self.old_digest,
            split.digest,
            self.plan.classes,
            self.plan.templates,
            self.tau,
            heads=getattr(self.model, "heads", None) is not None,
            log_probs=log_probs,
        )
        return self.cache.get_or_compute(key, lambda: self._evaluate(split, log_probs=log_probs))

    def _evaluate(self, split: Split, *, log_probs: bool) -> Predictions:
        return evaluate(
            self.model,
            self.class_tokens,
            split.bank,
            split.labels,
            self.tau,
            device=self.device,
            autocast=self.autocast,
            features=self._features.get(id(split)),
            log_probs=log_probs,
        )

    def validate(self) -> dict:
        """Evaluate on the validation split and assess the candidate (safespec.certify.selection): it is
        *feasible* when its validation evidence predicts that every capability passes the held-out
        certificate with at least ``optimize.select.min_certify_probability``. With
        ``optimize.calibrate.target_offset`` the target's offset is chosen here too, the admissible one with
        the best validation target accuracy; its score is the target accuracy at that offset."""
        val = self.data.validation
        new = self._evaluate(val, log_probs=True) if self.step > 0 else self.ref_val
        cons = constraint_values(self.constraints, self.metric, new, self.ref_val)
        drops = validation_drops(self.constraints, new, self.ref_val)
        acc = new.per_class_accuracy(len(self.plan.classes))
        t = self.plan.objective.target_index
        assert new.log_probs is not None  # evaluated with log_probs=True
        a: Assessment = self.selector.assess(new.log_probs, calibrate=self.calibrate, rivals=self.per_rival)
        out = {
            "constraints": cons,
            "drops": drops,
            "accuracy": acc,
            "target": float(acc[t]),
            "score": a.target_accuracy if self.calibrate else float(acc[t]),
            "smooth": a.target_smooth,  # the tie-break of equal scores (at the same offset as the score)
            # logits were at temperature tau: the offset in cosine units is offset * tau
            "offset": a.offset * self.tau,
            # per rival class (calibrate: per-rival; cosine units), in place of the offset above
            "rival_offsets": None if a.rival_offsets is None else [x * self.tau for x in a.rival_offsets],
            "feasible": a.admissible,
            "assessment": a,
        }
        return out

    # ------------------------------------------------------------------ one step
    def _shard(self, n: int) -> tuple[int, int, bool]:
        """This rank's rows of an n-row part of the step, and whether the part is split across ranks (a
        part with fewer rows than ranks is computed whole on every rank instead)."""
        if self.dist.active and n >= self.dist.world:
            return (*self.dist.bounds(n), True)
        return 0, n, False

    def _encode(self, t_rows: np.ndarray, p_rows: np.ndarray | None, caption_rows: torch.Tensor | None, pos_n: int):
        """Image features of the target rows then the store rows, the class text features and (contrastive
        objective) the caption features: each rank encodes its shard of each part, and the parts are
        gathered whole on every rank."""
        nt, npr = len(t_rows), (0 if p_rows is None else len(p_rows))
        if self.image_frozen and not self.model.class_towers:  # cached features: an index, no image pass
            x, isplit = None, False
        else:
            ilo, ihi, isplit = self._shard(nt + npr)
            parts = [self.data.target.bank[t_rows[min(ilo, nt) : min(ihi, nt)]]]
            if p_rows is not None:
                parts.append(self.data.store.bank[p_rows[max(ilo - nt, 0) : max(ihi - nt, 0)]])
            x = torch.cat(parts).to(self.device, non_blocking=True)
        plo, phi, psplit = self._shard(self.prompt_inputs.shape[0])
        heads = self.prompt_heads[plo:phi] if self.prompt_heads is not None else None
        prompts = self._prompts(plo, phi) if self.fixed_text is None else None
        caps = cap_heads = None
        if caption_rows is not None:
            nc = len(caption_rows)
            clo, chi, csplit = self._shard(nc)
            cap_heads = torch.full((nc,), self.model.negative_head, dtype=torch.long)  # on the host: no sync
            cap_heads[:pos_n] = self.plan.objective.target_index
            assert self.caption_inputs is not None  # the contrastive objective encoded the captions
            caps, cap_heads = self.caption_inputs[caption_rows[clo:chi]], cap_heads[clo:chi]
        with self.autocast():
            img, towers, txt, cap = self.towers(
                x, prompts, heads, caps, cap_heads, hidden=self.text_frozen, shared=not self.image_frozen
            )
        gather = self.dist.gather_rows
        if isplit:
            towers = {c: gather(f, nt + npr) for c, f in towers.items()}
        towers = {c: f.float() for c, f in towers.items()}
        if self.image_frozen:
            img = self._features[id(self.data.target)][_index(t_rows, self.device)]
            if p_rows is not None:
                img = torch.cat([img, self._features[id(self.data.store)][_index(p_rows, self.device)]])
        elif isplit:
            img = gather(img, nt + npr)
        if self.fixed_text is not None:
            text = self.fixed_text
        else:
            txt = gather(txt, self.prompt_inputs.shape[0]) if psplit else txt
            text = self.model.pool_templates(txt, len(self.plan.classes))
        if cap is not None:
            cap = (gather(cap, nc) if csplit else cap).float()
        return img.float(), towers, text.float(), cap

    def _prompts(self, lo: int, hi: int):
        """This rank's class prompts for a step: the frozen tower's cached features, or, with the text tower
        trained, the prompts as a tree of shared prefixes (safespec.model.prompt_tree: the same features,
        at a cost that follows the distinct prefix tokens rather than classes x context), built once."""
        if self.text_frozen:
            return self.prompt_inputs[lo:hi]
        if self._prompt_tree is None or self._prompt_tree[0] != (lo, hi):
            rows = self.prompt_tokens[lo:hi]
            self._prompt_tree = ((lo, hi), self.model.prompt_tree(rows) or rows)
        return self._prompt_tree[1]

    def train_step(self) -> torch.Tensor:
        dev = self.device
        pos, neg = self.target_sampler.sample()
        pos_idx = _index(pos, dev)
        t_rows = np.concatenate([pos, neg])
        constrained = self.formulation.draws_store
        p_rows = self.prot_sampler.sample()[0] if constrained else None
        caption_rows = None
        if self.plan.objective.kind != "ce":
            caption_rows = torch.cat([pos_idx, _index(neg, dev)])
        feats, towers, text, cap = self._encode(t_rows, p_rows, caption_rows, len(pos))
        nt = len(t_rows)
        yt = self.target_labels[_index(t_rows, dev)]
        loss = self.objective(
            feats[:nt],
            {c: f[:nt] for c, f in towers.items()},
            text,
            cap,
            yt,
            len(pos),
            pos_idx,
            self.model.decision_bias,
        )
        if constrained:
            assert p_rows is not None
            p_idx = _index(p_rows, dev)
            yp = self.store_labels[p_idx]
            logits, ce, margin = logits_losses(
                feats[nt:], text, yp, self.tau, self.model.decision_bias, {c: f[nt:] for c, f in towers.items()}
            )
            if not self.formulation.uses_reference:  # replay: plain CE on the store
                m_new = ce
            elif self.distill:
                m_new = (
                    kl_from_old(self.ref_store_logp[p_idx], F.log_softmax(logits.float(), 1)) * self.store_focal[p_idx]
                )
            elif self.metric == "margin":
                m_new = margin_drops(self.ref_store_losses[p_idx], ce) * self.store_focal[p_idx]
            else:
                m_new = metric_values(ce, margin, self.metric)
            k_of = self.cap_of_class[yp]
            K = len(self.constraints)
            # index_add, not bincount: bincount on a GPU reads the largest value back to size its output
            counts = torch.zeros(K, device=dev).index_add_(0, k_of, torch.ones_like(m_new, dtype=torch.float32))
            present = counts > 0
            mean_new = torch.zeros(K, device=dev).index_add_(0, k_of, m_new) / counts.clamp(min=1)
            with torch.no_grad():
                diff = m_new.detach() - self.ref_store_metric[p_idx]
                c = torch.zeros(K, device=dev).index_add_(0, k_of, diff) / counts.clamp(min=1) - self.slack
            weight = self.formulation.weight(c, present, self.step)
            # torch.where, not boolean indexing: indexing by a mask waits for the device to count it
            loss = loss + torch.where(present, weight * self.tau * mean_new, 0.0).sum() / present.sum().clamp(min=1)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    # ------------------------------------------------------------------ the loop
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> TrainOutcome:
        """Train to ``optimize.steps`` (or stop early after ``stop_after`` steps, for tests of resume)."""
        own = self.formulation.run(self, resume=resume)
        if own is not None:
            return own
        if resume:
            self.load_state()
        if self.step == 0 and not self.trajectory:
            self._record(self.validate())
        o = self.o
        t0 = time.perf_counter()
        with Progress(o.steps, f"train[{self.tag}]", quiet=self.quiet, initial=self.step, log=self.log) as bar:
            while self.step < o.steps:
                if stop_after is not None and self.step >= stop_after:
                    break
                loss = self.train_step()
                self.loss_sum += loss
                self.loss_count += 1
                status = self.formulation.status() if self.step % max(1, o.steps // 50) == 0 else None
                bar.update(1, status=status)
                if self.step % o.eval_every == 0 or self.step == o.steps:
                    self._record(self.validate())
                if self.step % o.checkpoint_every == 0 or self.step == o.steps:
                    self.seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_state()
        self.seconds += time.perf_counter() - t0
        return self._outcome()

    def _record(self, v: dict) -> None:
        names = [c.name for c in self.constraints]
        own = self.formulation.record(names, self.step)
        entry = {
            "step": self.step,
            "lr": float(self.sched.get_last_lr()[0])
            if self.step > 0
            else float(self.o.lr * lr_factor(0, self.o.warmup_steps, self.o.steps)),
            "beta": own["beta"],
            "train_loss": float(self.loss_sum) / self.loss_count if self.loss_count else None,
            "target_metric": v["target"],
            "constraints": dict(zip(names, map(float, v["constraints"]))),
            "val_drop": dict(zip(names, map(float, v["drops"]))),
            "u": own["u"],
            "multipliers": own["multipliers"],
            "val_accuracy": {
                c: (None if math.isnan(a) else float(a)) for c, a in zip(self.plan.classes, v["accuracy"])
            },
            "feasible": v["feasible"],
            "certify_probability": v["assessment"].probability,
            "val_drop_smooth": {e.name: e.drop for e in v["assessment"].evidence},
        }
        if self.calibrate:
            entry.update(target_offset=v["offset"], target_calibrated=v["score"])
        if v["rival_offsets"] is not None:
            entry["target_rival_offsets"] = dict(zip(self.plan.classes, v["rival_offsets"]))
        entry["target_smooth"] = v["smooth"]
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.trajectory.append(entry)
        # constrained methods select among checkpoints that keep every constraint on validation; the
        # baselines select by the target alone, so that they show what the constraints buy
        self.candidates.consider(
            self.step,
            v,
            eligible=v["feasible"] or not self.formulation.constrained,
            weights=lambda: self.old_state if self.step == 0 else _cpu_state(self.model),
            with_offset=self._with_offset,
        )
        self._write_trajectory()

    def _with_offset(
        self, state: dict[str, torch.Tensor], offset: float, rivals: list[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """``state`` with ``offset`` (cosine units) added to the target's class bias, or with ``rivals``
        (per rival class, cosine units) appended as the target's row of per-rival offsets: the row is
        calibrated on the logits every earlier row leaves, so it comes after them (DecisionBias)."""
        t = self.plan.objective.target_index
        if rivals is not None:
            C = len(self.plan.classes)
            order = state.get("rival_order", torch.zeros(0, dtype=torch.int64)).detach().cpu()
            rows = state.get("rival_bias", torch.zeros(0, C)).detach().to("cpu", torch.float32)
            row = torch.tensor(rivals, dtype=torch.float64).to(torch.float32)[None]
            return {
                **state,
                "rival_order": torch.cat([order, torch.tensor([t], dtype=torch.int64)]),
                "rival_bias": torch.cat([rows, row]),
            }
        if not offset:
            return state
        bias = state.get("class_bias", torch.zeros(len(self.plan.classes))).detach().to("cpu", torch.float32).clone()
        bias[t] += offset
        return {**state, "class_bias": bias}

    def _write_trajectory(self) -> None:
        if self.run_dir is not None and self.dist.is_main:
            atomic_write_text(
                self.run_dir / f"trajectory-{self.tag}.jsonl", "".join(json.dumps(e) + "\n" for e in self.trajectory)
            )

    def _outcome(self) -> TrainOutcome:
        c = self.candidates
        fell_back = c.best_state is None
        q = self.o.select.min_certify_probability
        target, t_index = self.plan.objective.target_class, self.plan.objective.target_index
        if fell_back:
            reason = (
                f"no checkpoint with a better target on validation was predicted to pass every held-out "
                f"certificate with probability {q:.2f}; the old model is kept as the answer"
            )
            if c.blocked:
                reason += f". {c.blocked['summary']}"
        else:
            among = (
                f"among candidates predicted to pass every capability's held-out certificate with "
                f"probability >= {q:.2f}"
                if self.formulation.constrained
                else "(a baseline: selected by the target alone)"
            )
            reason = f"step {c.best_step}: best validation accuracy on {target!r} ({c.best_score:.3f}) {among}"
            if self.calibrate:
                how = f"offset by {c.best_offset:+.4f} (cosine units)"
                if c.best_rival_offsets is not None:
                    lo, hi = min(c.best_rival_offsets), max(c.best_rival_offsets)
                    how = f"offset per rival class by {lo:+.4f} to {hi:+.4f} (cosine units)"
                reason = (
                    f"step {c.best_step}{' (the old model)' if c.best_step == 0 else ''}, with the "
                    f"{target!r} logit {how}: best calibrated validation accuracy on the target "
                    f"({c.best_score:.3f}) {among}"
                )
        validation: dict[str, Any] = {"target_offset": c.best_offset} if self.calibrate else {}
        if c.best_rival_offsets is not None and not fell_back:
            validation["target_rival_offsets"] = {
                name: x for i, (name, x) in enumerate(zip(self.plan.classes, c.best_rival_offsets)) if i != t_index
            }
        validation["min_certify_probability"] = q
        if c.blocked and self.formulation.constrained:
            validation["blocked"] = c.blocked
        state = self.old_state if fell_back or c.best_state is None else c.best_state
        return TrainOutcome(
            method=self.method,
            state_dict=state,
            selected_step=c.best_step,
            fell_back_to_old=fell_back,
            reason=reason,
            trajectory=list(self.trajectory),
            steps=self.step,
            seconds=self.seconds,
            validation=validation,
        )

    def validate_old(self) -> dict:
        saved, self.step = self.step, 0
        try:
            return self.validate()
        finally:
            self.step = saved

    # ------------------------------------------------------------------ state
    # ------------------------------------------------------------------ state (safespec.train.state)
    def fingerprint(self) -> str:
        return state.fingerprint(self)

    def state_path(self) -> Path:
        return state.state_path(self)

    def state_dict(self) -> dict:
        return state.state_dict(self)

    def save_state(self) -> None:
        state.save_state(self)

    def load_state(self) -> None:
        state.load_state(self)
