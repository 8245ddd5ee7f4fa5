"""A trainer's whole state, saved atomically every ``checkpoint_every`` steps and loaded for ``--resume``:
the model, optimizer, schedule, constraint weights, samplers, trajectory, the best candidate so far and
the RNG, so that a resumed run ends bit-identical to an uninterrupted one on CPU. A state made with
another spec, model or data is refused (its fingerprint)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import RunError, atomic_write_bytes

if TYPE_CHECKING:
    from .trainer import Trainer

#: Bumped whenever the saved state's layout changes: an older state is refused, not misread.
STATE_VERSION = 5  # 2: the calibrated target offset is part of the state; 3: what blocked selection; 4: the tie-break;
# 5: the per-rival offsets


def fingerprint(t: Trainer) -> str:
    blob = json.dumps(
        {
            "plan": t.plan.to_dict(),
            "method": t.method,
            "old": t.old_digest,
            "data": [t.data.store.digest, t.data.target.digest, t.data.validation.digest],
            "v": STATE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def state_path(t: Trainer) -> Path:
    if t.run_dir is None:
        raise RunError("training state needs a run directory")
    return t.run_dir / "checkpoints" / f"state-{t.tag}.pt"


def state_dict(t: Trainer) -> dict:
    st = {
        "version": STATE_VERSION,
        "fingerprint": fingerprint(t),
        "step": t.step,
        "model": t.model.state_dict(),
        "opt": t.opt.state_dict(),
        "sched": t.sched.state_dict(),
        "weights": t.formulation.state_dict(),
        "loss_sum": t.loss_sum,
        "loss_count": t.loss_count,
        "prot_sampler": json.dumps(t.prot_sampler.state_dict(), default=_jsonable),
        "target_sampler": json.dumps(t.target_sampler.state_dict(), default=_jsonable),
        "trajectory": json.dumps(t.trajectory),
        **t.candidates.state_dict(),
        "seconds": t.seconds,
        "torch_rng": torch.get_rng_state(),
    }
    st.update(t.objective.state_dict())  # the contrastive objective's moving averages
    return st


def save_state(t: Trainer) -> None:
    if t.run_dir is None or not t.dist.is_main:
        return
    st = state_dict(t)
    if t.candidates.best_state is not None:
        st["best_state"] = t.candidates.best_state
    buf = io.BytesIO()
    torch.save(st, buf)
    atomic_write_bytes(state_path(t), buf.getvalue())


def load_state(t: Trainer) -> None:
    path = state_path(t)
    if not path.exists():
        raise RunError(f"{path}: no training state to resume from (run without --resume first)")
    try:
        st = torch.load(path, map_location=t.device, weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise RunError(
            f"{path}: unreadable training state ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise RunError(f"{path}: not a safespec training state of version {STATE_VERSION}")
    if st.get("fingerprint") != fingerprint(t):
        raise RunError(
            f"{path}: the training state was made with another spec, model or data; remove it or run without --resume"
        )
    t.model.load_state_dict(st["model"])
    t.opt.load_state_dict(st["opt"])
    t.sched.load_state_dict(st["sched"])
    t.formulation.load_state_dict(st["weights"])
    t.loss_sum, t.loss_count = st["loss_sum"], st["loss_count"]
    t.prot_sampler.load_state_dict(json.loads(st["prot_sampler"], object_hook=_unjson))
    t.target_sampler.load_state_dict(json.loads(st["target_sampler"], object_hook=_unjson))
    t.trajectory = json.loads(st["trajectory"])
    t.candidates.load_state_dict(st, st.get("best_state"))
    t.step, t.seconds = st["step"], st["seconds"]
    torch.set_rng_state(st["torch_rng"])
    if t.objective.state_dict():
        t.objective.load_state_dict(st)
    t.log(f"resumed {t.tag} at step {t.step}/{t.o.steps}")


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__nd__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _unjson(d):
    if "__nd__" in d:
        return np.asarray(d["__nd__"], dtype=d["dtype"])
    return d
