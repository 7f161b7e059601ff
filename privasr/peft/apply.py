"""From a recipe's ``init`` / ``peft`` / ``finetune`` keys to a model ready to fine-tune.

    model = build_model(cfg, vocab_size)
    summary = prepare_model(cfg, model)      # load the pre-trained encoder, new CTC head, PEFT

``init=CKPT`` copies every encoder weight of a privasr checkpoint (model sizes must agree) and
leaves the CTC head newly initialised (``finetune.keep_head=true`` keeps the checkpoint's).
``peft=METHOD`` then freezes (``requires_grad=False``) everything but the method's parameters
and the head. Frozen parameters are not given to the optimizer, get no (per-example) gradient
and no noise: the clipping engines and the DP strategy only touch trainable parameters.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable

from torch import nn

from privasr.peft.adapters import add_adapters
from privasr.peft.bitfit import bitfit_names
from privasr.config import DEFAULT_LORA_TARGETS, METHODS, FinetuneConfig
from privasr.peft.lora import add_lora, lora_layers, merge_lora

__all__ = ["HEAD", "apply_peft", "load_pretrained", "prepare_model", "rebuild", "merge_lora",
           "peft_summary", "head_of", "lora_targets_of"]

HEAD = "ctc_head"
STRUCTURAL = ("lora", "rp", "adapters")  # methods that add modules (a checkpoint needs them)


def head_of(model: nn.Module) -> str:
    """The CTC head's module name: ``model.head_name`` (``hf.lm_head`` for a transformers
    model, privasr.models.hf_ctc), else ``ctc_head`` (the Conformer-CTC)."""
    return getattr(model, "head_name", HEAD)


def lora_targets_of(model: nn.Module, fc: FinetuneConfig) -> list[str]:
    """``finetune.lora_targets``; left at the Conformer default, a model with its own module
    names (``model.default_lora_targets``, e.g. the transformers q/k/v/out projections and
    feed-forward linears) gets its own default instead."""
    default = getattr(model, "default_lora_targets", None)
    if default is not None and list(fc.lora_targets) == DEFAULT_LORA_TARGETS:
        return list(default)
    return list(fc.lora_targets)


def _always_frozen(model: nn.Module, names: list[str]) -> set[str]:
    """Names under the model's ``frozen_prefixes()`` (e.g. a frozen feature encoder)."""
    prefixes = tuple(getattr(model, "frozen_prefixes", lambda: ())())
    return {n for n in names if prefixes and n.startswith(prefixes)}


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of the model's encoder blocks
    (``model.peft_blocks()`` for a transformers model, else ``encoder.blocks``)."""
    blocks = model.peft_blocks()[0] if hasattr(model, "peft_blocks") else \
        getattr(getattr(model, "encoder", None), "blocks", None)
    for name, mod in model.named_modules():
        if mod is blocks and isinstance(mod, nn.ModuleList):
            return name, mod
    raise ValueError("finetune.top_blocks needs a model with encoder blocks (a ModuleList)")


def top_block_range(model: nn.Module, k: int
                    ) -> tuple[int, Callable[[str], bool] | None]:
    """(index of the first of the top ``k`` blocks, a test "is this module name in them?");
    (0, None) for k = 0 (every block)."""
    if not k:
        return 0, None
    prefix, blocks = block_list(model)
    if not 0 < k <= len(blocks):
        raise ValueError(f"finetune.top_blocks={k}: the model has {len(blocks)} blocks")
    keep = tuple(f"{prefix}.{i}." for i in range(len(blocks) - k, len(blocks)))
    return len(blocks) - k, lambda name: (name + ".").startswith(keep)


def in_top_blocks(model: nn.Module, names: list[str], k: int) -> list[str]:
    """``names`` that are in the top ``k`` encoder blocks or the CTC head."""
    prefix, blocks = block_list(model)
    if not 0 < k <= len(blocks):
        raise ValueError(f"finetune.top_blocks={k}: the model has {len(blocks)} blocks")
    keep = tuple(f"{prefix}.{i}." for i in range(len(blocks) - k, len(blocks)))
    return [n for n in names if n.startswith(keep) or n.startswith(head_of(model) + ".")]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"peft={method!r}; valid methods: {', '.join(METHODS)}")


def load_pretrained(model: nn.Module, path: str, *, keep_head: bool = False) -> dict[str, Any]:
    """Copy the encoder (and, with ``keep_head``, the CTC head) of checkpoint ``path``."""
    from pathlib import Path

    from privasr.checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise FileNotFoundError(f"init={path}: no such checkpoint (pre-train first, e.g. "
                                f"`privasr train configs/pretrain.yaml`)")
    ck = load_checkpoint(path)
    state = ck.get("model")
    if not isinstance(state, dict):
        raise ValueError(f"init={path}: not a privasr training checkpoint (no 'model' weights)")
    mine = model.state_dict()
    extra = sorted(set(state) - set(mine))
    if extra:
        peft = (ck.get("config") or {}).get("peft", "none")
        raise ValueError(f"init={path}: the checkpoint has weights this model lacks, e.g. "
                         f"{extra[:3]} (it was trained with peft={peft}); initialise from a "
                         f"plain checkpoint, e.g. the merged.pt a LoRA run writes")
    wanted = [k for k in mine if not k.startswith(head_of(model) + ".") or keep_head]
    size = f"model.size must match the pre-trained model ({(ck.get('config') or {}).get('model')})"
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"init={path}: the checkpoint lacks {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}: {size}")
    bad = [k for k in wanted if state[k].shape != mine[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"init={path}: shape of {k} is {tuple(state[k].shape)} in the checkpoint "
                         f"but {tuple(mine[k].shape)} here: {size}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return {"init": str(path), "loaded_tensors": len(wanted), "new_head": not keep_head}


def apply_peft(model: nn.Module, method: str, fc: FinetuneConfig) -> dict[str, Any]:
    """Freeze and adapt ``model`` in place for ``method``; return :func:`peft_summary`."""
    _check_method(method)
    if method in ("none", "full"):
        train = [n for n, _ in model.named_parameters()]
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        # with top_blocks, modules are added only where they train: the frozen prefix stays
        # the pre-trained network itself (one cached prefix for every method and seed)
        first, within = top_block_range(model, fc.top_blocks)
        if method == "lora":
            add_lora(model, lora_targets_of(model, fc), rank=fc.lora_rank, alpha=fc.lora_alpha,
                     within=within)
        elif method == "rp":
            add_lora(model, lora_targets_of(model, fc), rank=fc.lora_rank, alpha=fc.lora_alpha,
                     train_a=False, within=within)
        elif method == "adapters":
            add_adapters(model, fc.adapter_dim, first=first)
        names = [n for n, p in model.named_parameters()]
        train = [n for n in names if n.startswith(head_of(model) + ".")]
        if method == "bitfit":
            train += bitfit_names(model, norms=fc.bitfit_norms)
        # parameters the method created are trainable as created (rp keeps its A frozen)
        new = {n for n, p in model.named_parameters() if p.requires_grad}
        train += sorted(new)
    frozen = _always_frozen(model, train)
    train = [n for n in train if n not in frozen]
    if fc.top_blocks:
        train = in_top_blocks(model, train, fc.top_blocks)
    for pat in fc.extra_trainable:
        hit = [n for n, _ in model.named_parameters() if fnmatchcase(n, pat)]
        if not hit:
            raise ValueError(f"finetune.extra_trainable pattern {pat!r} matches no parameter")
        train += hit
    train_set = set(train)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train_set)
    return peft_summary(model, method)


def peft_summary(model: nn.Module, method: str) -> dict[str, Any]:
    params = list(model.named_parameters())
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    total = sum(p.numel() for _, p in params)
    return {"method": method, "trainable_params": trainable, "total_params": total,
            "trainable_fraction": trainable / max(total, 1),
            "trainable_tensors": sum(1 for _, p in params if p.requires_grad),
            "lora_layers": len(lora_layers(model))}


def prepare_model(cfg: Any, model: nn.Module, log: Callable[[str], None] = print
                  ) -> dict[str, Any] | None:
    """Apply the recipe's ``init`` and ``peft``; None when the recipe uses neither."""
    if not cfg.init and cfg.peft == "none":
        return None
    _check_method(cfg.peft)
    info: dict[str, Any] = {}
    if cfg.init:
        info.update(load_pretrained(model, cfg.init, keep_head=cfg.finetune.keep_head))
    info.update(apply_peft(model, cfg.peft, cfg.finetune))
    log(f"peft={cfg.peft}: {info['trainable_params']:,} of {info['total_params']:,} parameters "
        f"trainable ({100 * info['trainable_fraction']:.2f} %)"
        + (f"; encoder from {cfg.init}, {'new' if info['new_head'] else 'kept'} CTC head"
           if cfg.init else ""))
    return info


def rebuild(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the modules a PEFT checkpoint (its saved ``config``) holds."""
    method = config.get("peft", "none")
    if method in STRUCTURAL:
        fields = FinetuneConfig.__dataclass_fields__
        fc = FinetuneConfig(**{k: v for k, v in (config.get("finetune") or {}).items()
                               if k in fields})
        apply_peft(model, method, fc)
    return model


def finish_peft(cfg: Any, trainer: Any, info: dict[str, Any] | None) -> dict[str, Any] | None:
    """After training: for LoRA / rp, write ``OUT/merged.pt``, a plain-architecture checkpoint
    with every update folded into its base weight (loadable by eval, transcribe and init)."""
    if info is None:
        return None
    info = dict(info)
    if lora_layers(trainer.model):
        import copy
        from pathlib import Path

        from privasr.config import to_dict
        from privasr.checkpoint import save_checkpoint

        model = copy.deepcopy(trainer.model).cpu()
        merge_lora(model)
        config = to_dict(cfg)
        config.update(peft="none", init="")
        path = Path(cfg.out_dir) / "merged.pt"
        save_checkpoint(path, {"model": model.state_dict(), "vocab": list(trainer.vocab),
                               "model_config": vars(model.cfg).copy(), "config": config,
                               "merged_from": str(trainer.ckpt_path)})
        info["merged_checkpoint"] = str(path)
    return info
