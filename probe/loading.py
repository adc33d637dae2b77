"""Loading a policy (HF causal LM + tokenizer, optional PEFT LoRA) from a local directory.

Local directories only: hub ids are never fetched (``local_files_only=True``), safetensors
are preferred, and ``trust_remote_code`` is off unless asked for. Every missing piece is
reported as a FileNotFoundError that names the path and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probe.precision import DTYPES, dtype_name, exact_float64_norms, resolve_dtype

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

log = logging.getLogger("probe")
_warned_toy_folders: set[str] = set()  # ./toy folders already warned about (once per process and folder)


@dataclass
class LoraSettings:
    """A fresh LoRA adapter to wrap the policy with (``peft.LoraConfig``).

    Args:
        r: rank of the low-rank update.
        alpha: scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA input (0 keeps the probe deterministic).
        target_modules: module names to adapt, e.g. ``["q_proj", "v_proj"]`` or ``"all-linear"``;
            None uses PEFT's default for the architecture.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None


@dataclass
class PolicySettings:
    """Where the policy comes from and how it is loaded.

    Args:
        path: local directory of an HF checkpoint (``config.json``, weights, tokenizer). Hub ids are not
            fetched: download the model first and pass its directory. Or a Lightning checkpoint of the training
            run (a ``.ckpt`` file, or the ``.ckpt`` directory ``ModelParallelStrategy`` writes): the policy's
            weights are read from it, its config and tokenizer from ``config_path``.
        config_path: with a Lightning checkpoint as ``path``: the HF directory of the model it trained
            (``config.json`` and tokenizer; its weights are not read).
        dtype: parameter dtype: ``auto`` (the dtype the weights were saved in, else ``config.json``'s; half
            precision is loaded as float32, exactly: a step of a real lr rounds away against bfloat16 weights, so
            nothing could be measured), ``float32``, ``bfloat16``, ``float16`` or ``float64`` (float64 also makes
            RMSNorm compute in float64, see ``probe.precision``). A float32 policy loaded in bfloat16 gives wrong
            small-eta numbers.
        attn_implementation: ``sdpa`` (default), ``eager`` or another one transformers knows.
        adapter_path: local directory of a saved PEFT adapter to load on top (trainable).
        lora: wrap the policy in a fresh LoRA adapter with these settings (instead of ``adapter_path``).
        trust_remote_code: allow model code shipped inside the checkpoint directory to run (off by default).
        device: where to put the model, e.g. ``cpu`` or ``cuda:0`` (checked before anything is loaded: a GPU
            device needs a GPU that torch sees).
    """

    path: str
    config_path: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    adapter_path: str | None = None
    lora: LoraSettings | None = None
    trust_remote_code: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        parse_device(self.device)  # the spelling; whether this machine has it is checked when loading

    def directory(self) -> Path:
        """The checkpoint directory: ``path``, or the built-in toy world's (built once and cached) for ``toy``; a
        local folder named ``toy`` is ``./toy`` (``toy`` with such a folder in the working directory warns)."""
        if self.path == "toy":
            from probe.toy.world import build_toy_world

            local = Path("toy").resolve()
            if local.is_dir() and str(local) not in _warned_toy_folders:
                _warned_toy_folders.add(str(local))
                log.warning(
                    "policy.path is 'toy': using the built-in toy world, not the local folder %s. Fix: to use that "
                    "folder, write policy.path: ./toy",
                    local,
                )
            return build_toy_world()
        if lightning_checkpoint(Path(self.path).expanduser()) is not None:
            return self._config_directory()
        return Path(self.path).expanduser()

    def _config_directory(self) -> Path:
        """``config_path`` for a Lightning checkpoint as ``path`` (refused, with the fix, when it is not given)."""
        if self.config_path is None:
            raise ValueError(
                f"policy.path {self.path} is a Lightning checkpoint: it holds the policy's weights but not its "
                "config or tokenizer. Fix: set policy.config_path to the HF directory of the model it trained "
                "(config.json and tokenizer; e.g. the policy.path of the fit), or pass an exported policy directory "
                "instead (model.save_pretrained(dir); probe's GRPOModule writes <run>/policy/ at the end of fit)"
            )
        return Path(self.config_path).expanduser()

    def weights_checkpoint(self) -> Path | None:
        """The Lightning checkpoint the weights come from (None: they are in :meth:`directory`)."""
        if self.path == "toy":
            return None
        return lightning_checkpoint(Path(self.path).expanduser())

    def load(self) -> tuple[torch.nn.Module, Any]:
        """The policy (in eval mode; a float64 one with float64 RMSNorm) and its tokenizer, loaded with these
        settings. Local directories only: hub ids are never fetched; every missing piece names the path and
        the fix."""
        return _load(self.directory(), self)

    def resolved_dtype(self) -> tuple[torch.dtype, str]:
        """The dtype the policy is loaded in and why (``dtype: auto`` reads the checkpoint, see
        :func:`checkpoint_dtype`)."""
        if str(self.dtype).lower() != "auto":
            dtype = resolve_dtype(self.dtype)
            if dtype in (torch.bfloat16, torch.float16):
                _warn_if_lower_precision(self.directory(), dtype)
            return dtype, "set by policy.dtype"
        directory = check_checkpoint_dir(self.directory(), weights=self.weights_checkpoint() is None)
        dtype, source = checkpoint_dtype(directory)  # (a Lightning checkpoint's: its config directory's)
        if dtype in (torch.bfloat16, torch.float16):  # exact upcast: the master weights of a mixed-precision run
            return torch.float32, (
                f"auto: {source}, loaded as float32 (exact; a step of a real lr rounds away against "
                f"{dtype_name(dtype)} weights, so Delta H could not be measured)"
            )
        return dtype, f"auto: {source}"


_warned_lower_precision: set[tuple[str, torch.dtype]] = set()


def _warn_if_lower_precision(directory: Path, dtype: torch.dtype) -> None:
    """Warn (once per checkpoint and dtype) when ``dtype`` holds fewer mantissa bits than the saved weights."""
    saved, source = checkpoint_dtype(check_checkpoint_dir(directory))
    if torch.finfo(saved).eps >= torch.finfo(dtype).eps or (str(directory), dtype) in _warned_lower_precision:
        return
    _warned_lower_precision.add((str(directory), dtype))
    log.warning(
        "policy.dtype %s loads weights saved in higher precision (%s) in %s: the weights are rounded, and theta + "
        "eta * d rounds back to theta wherever eta * |d| is below half a unit in the last place of a weight, so "
        "small-eta Delta H is that of a different, rounded step. To run the forwards in %s without losing the step, "
        "keep the weights as saved (policy.dtype: auto or float32) and autocast the forwards (predict: "
        "precision.autocast: %s; fit: trainer.precision: %s-mixed)",
        dtype_name(dtype),
        source,
        dtype_name(dtype),
        dtype_name(dtype),
        dtype_name(dtype),
        "bf16" if dtype == torch.bfloat16 else "16",
    )


def checkpoint_dtype(directory: Path) -> tuple[torch.dtype, str]:
    """The dtype a checkpoint was saved in, and where that was read: the first floating tensor of its (first)
    safetensors file (the header only: what the weights are); else ``config.json``'s ``dtype`` (transformers 5)
    or ``torch_dtype``; else float32 (what ``torch`` makes by default), said so. Where the config names another
    dtype than the weights hold (a config copied from another checkpoint), the weights win and the source says
    both."""
    import json

    config = json.loads((directory / "config.json").read_text())
    named = next(
        (
            (key, value)
            for key in ("dtype", "torch_dtype")
            if isinstance(value := config.get(key), str) and value.lower().removeprefix("torch.") in DTYPES
        ),
        None,
    )
    names = {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16"}
    header = _safetensors_header(directory)
    stored = next(
        (
            names[entry["dtype"]]
            for _, entry in sorted(header.items())
            if isinstance(entry, dict) and entry.get("dtype") in names
        ),
        None,
    )
    if stored is not None:
        source = f"weights saved as {stored}"
        if named is not None and resolve_dtype(named[1]) != resolve_dtype(stored):
            source += f"; config.json says {named[0]} = {named[1]}, but the weights are what was trained"
        return resolve_dtype(stored), source
    if named is not None:
        return resolve_dtype(named[1]), f"config.json {named[0]} = {named[1]}"
    return torch.float32, "neither the weights' header nor config.json names a dtype; float32 assumed"


def _safetensors_header(directory: Path) -> dict[str, Any]:
    """The JSON header of the checkpoint's (first) safetensors file, or ``{}``; never reads the tensors."""
    import json
    import struct

    index = directory / "model.safetensors.index.json"
    file = directory / "model.safetensors"
    if not file.is_file() and index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        file = directory / shards[0] if shards else file
    if not file.is_file():
        return {}
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:  # empty or truncated: loading reports it with its own message
            return {}
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:  # a corrupt header; loading reports it with its own message
            return {}
        try:
            return json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}


def parse_device(device: str) -> torch.device:
    """``policy.device`` as a ``torch.device``, refused with the fix when torch does not know the name."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"policy.device {device!r} is not a device torch knows ({str(e).splitlines()[0]}). Fix: set "
            "policy.device to cpu, cuda or cuda:N (the N-th GPU)"
        ) from None


def gpus_available() -> int:
    """How many CUDA GPUs torch can use on this machine (0 without a GPU or with a CPU build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def no_gpu_error(asked: str, fix: str) -> ValueError:
    """The refusal of a setting (``asked``: what it says) that needs a GPU on a machine where torch sees none."""
    return ValueError(
        f"{asked} asks for a GPU but torch sees none on this machine (torch {torch.__version__}, CUDA build: "
        f"{torch.version.cuda or 'none'}). Fix: {fix}, or run on a machine with a CUDA GPU and a CUDA build of torch"
    )


def check_device(device: str) -> torch.device:
    """``policy.device`` as a ``torch.device``, refused with the fix when torch does not know it or when it names a
    GPU this machine does not have; called before anything is loaded (settings can be written on another
    machine)."""
    parsed = parse_device(device)
    if parsed.type == "cuda":
        available = gpus_available()
        if available == 0:
            raise no_gpu_error(f"policy.device {device!r}", "set policy.device to cpu")
        if parsed.index is not None and parsed.index >= available:
            raise ValueError(
                f"policy.device {device!r} asks for GPU {parsed.index} but this machine has {available} "
                f"(cuda:0 to cuda:{available - 1}). Fix: set policy.device to one of those, or to cpu"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"policy.device {device!r} asks for Apple's MPS but torch cannot use it on this machine. Fix: set "
            "policy.device to cpu"
        )
    return parsed


NONFINITE_CHUNK = 1 << 24  # entries counted at once when a parameter is suspect: bounds the temporary mask to 16 MB


def check_finite_parameters(model: torch.nn.Module, where: str | Path) -> None:
    """Refuse a policy with NaN or inf weights (a corrupt or diverged checkpoint), naming up to 3 parameters, how
    many there are and the fix. One sum per parameter (NaN and inf propagate through it; a read of the weights at
    memory speed, no copy); only a parameter whose sum is not finite (or overflowed) is counted entry by entry."""
    bad: list[tuple[str, int, int]] = []  # (name, non-finite entries, entries)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or bool(torch.isfinite(p.sum())):
                continue
            flat = p.detach().reshape(-1)
            count = sum(int((~torch.isfinite(c)).sum()) for c in flat.split(NONFINITE_CHUNK))
            if count:  # else the sum of finite entries overflowed
                bad.append((name, count, flat.numel()))
    if bad:
        named = ", ".join(f"{n!r} ({k} of {total} entries)" for n, k, total in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"the policy in {where} has non-finite weights (NaN or inf) in {len(bad)} parameter(s): {named}{more}; the "
            "checkpoint is corrupt or was saved after the training diverged, and no entropy change can be measured "
            "from it. Fix: probe an earlier checkpoint, from before the loss or gradients became non-finite (or copy "
            "this one again if the copy is corrupt)"
        )


HUB_HINT = (
    "probe loads local directories only and never fetches hub ids; "
    "download the model first (e.g. `hf download <id> --local-dir DIR`) and pass DIR"
)


def check_checkpoint_dir(path: str | Path, weights: bool = True) -> Path:
    """The directory as a Path, after checking it holds ``config.json`` and (``weights``) weights; else
    FileNotFoundError."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"policy directory {str(directory)!r} does not exist; {HUB_HINT}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory / 'config.json'} is missing: {directory} is not an HF checkpoint directory "
            "(save one with model.save_pretrained(dir)); " + HUB_HINT
        )
    if weights and not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"no model weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}; "
            "save them with model.save_pretrained(dir) (safetensors) or point path at the directory that holds them"
        )
    return directory


def refuse_remote_code(directory: Path, trust_remote_code: bool) -> None:
    """Refuse a checkpoint that ships its own modelling/tokenizer code (``auto_map``) unless trusted.

    Without ``trust_remote_code`` transformers would silently load its built-in class for the
    ``model_type`` instead, which may not be the model that was trained: refuse both silently
    running and silently replacing custom code.
    """
    import json

    for name in ("config.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{file} is not valid JSON ({e}); the checkpoint is corrupt. Fix: copy it again or re-save it with "
                "save_pretrained(dir)"
            ) from None
        if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
            raise ValueError(
                f"{file} has an auto_map ({config['auto_map']}): the checkpoint ships its own Python code, which probe "
                "does not run unless told to. Fix: if you trust the code in that directory, set "
                "policy.trust_remote_code=true (--model.init_args.policy.trust_remote_code true); otherwise use a "
                "checkpoint of a built-in architecture"
            )


def check_adapter_dir(path: str | Path) -> Path:
    """The adapter directory as a Path, after checking it holds ``adapter_config.json`` and weights."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} does not exist; pass the local directory a PEFT adapter was saved to"
        )
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{directory / 'adapter_config.json'} is missing: {directory} is not a PEFT adapter directory "
            "(save one with peft_model.save_pretrained(dir))"
        )
    if not any((directory / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise FileNotFoundError(
            f"no adapter weights in {directory}: expected {' or '.join(ADAPTER_WEIGHT_FILES)}; save them with "
            "peft_model.save_pretrained(dir)"
        )
    return directory


def _tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    for directory in (model_dir, adapter_dir):
        if directory is not None and any((directory / name).is_file() for name in TOKENIZER_FILES):
            return directory
    where = str(model_dir) + ("" if adapter_dir is None else f" or {adapter_dir}")
    raise FileNotFoundError(
        f"no tokenizer in {where}: expected one of {', '.join(TOKENIZER_FILES)}; "
        "save it next to the model with tokenizer.save_pretrained(dir)"
    )


def load_policy(path: str | Path, **settings: Any) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory, optionally with a LoRA adapter.

    Args:
        path: local HF checkpoint directory (config.json, weights, tokenizer).
        **settings: the other fields of :class:`PolicySettings` (``dtype``, ``attn_implementation``,
            ``adapter_path``, ``lora``, ``trust_remote_code``, ``device``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. A tokenizer without a pad token gets
        its EOS token as pad.
    """
    return PolicySettings(path=str(path), **settings).load()


def _load(directory: Path, s: PolicySettings) -> tuple[torch.nn.Module, Any]:
    """:meth:`PolicySettings.load` (after ``toy`` is resolved to its directory)."""
    check_device(s.device)  # before anything is read
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_path, lora, trust_remote_code = s.adapter_path, s.lora, s.trust_remote_code
    if adapter_path is not None and lora is not None:
        raise ValueError("give either adapter_path (load a saved adapter) or lora (wrap in a fresh one), not both")
    weights = s.weights_checkpoint()
    model_dir = check_checkpoint_dir(directory, weights=weights is None)
    torch_dtype = s.resolved_dtype()[0]
    adapter_dir = check_adapter_dir(adapter_path) if adapter_path is not None else None
    refuse_remote_code(model_dir, trust_remote_code)
    tokenizer_dir = _tokenizer_dir(model_dir, adapter_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer_dir), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # a corrupt tokenizer.json raises anything from JSONDecodeError to a tokenizers panic
        raise ValueError(
            f"could not load the tokenizer in {tokenizer_dir} ({type(e).__name__}: {e}); its files are corrupt or "
            "incomplete (e.g. an interrupted copy). Fix: copy the tokenizer files again or re-save them with "
            "tokenizer.save_pretrained(dir)"
        ) from e
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    has_safetensors = any((model_dir / n).is_file() for n in WEIGHT_FILES[:2])
    try:
        if weights is not None:  # the architecture from config_path, the weights from the Lightning checkpoint
            model = _model_from_lightning_checkpoint(weights, model_dir, torch_dtype, s)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir),
                dtype=torch_dtype,
                attn_implementation=s.attn_implementation,
                local_files_only=True,
                use_safetensors=has_safetensors,
                trust_remote_code=trust_remote_code,
            )
    except LightningCheckpointError:
        raise
    except Exception as e:  # safetensors' "header too large", a truncated shard, a config transformers cannot read
        import pickle

        if isinstance(e, pickle.UnpicklingError):  # transformers loads *.bin with torch.load(weights_only=True)
            text = str(e).partition("WeightsUnpickler error:")[2].strip()
            detail = text.split("\n")[0].split(". ")[0] if text else ""
            raise ValueError(
                f"the weights in {model_dir} were refused for safety: a pickled weight file holds objects other than "
                f"tensors (which could run code when loaded) or is not a torch file ({detail or type(e).__name__}); "
                "weights are only loaded with weights_only=True. Fix: if you trust the checkpoint, convert it to "
                "safetensors (model.save_pretrained(dir, safe_serialization=True)); if it is corrupt, copy it again"
            ) from e
        raise ValueError(
            f"could not load the model in {model_dir} ({type(e).__name__}: {e}); its config.json or weight files are "
            "corrupt or incomplete (e.g. an interrupted copy or download). Fix: copy the checkpoint again or re-save "
            "it with model.save_pretrained(dir)"
        ) from e
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        except Exception as e:
            raise ValueError(
                f"could not load the PEFT adapter in {adapter_dir} ({type(e).__name__}: {e}); its files are corrupt "
                "or were saved for another base model. Fix: copy the adapter again or re-save it with "
                "peft_model.save_pretrained(dir), and check that policy.path is the base model it was trained on"
            ) from e
    elif lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model = model.to(device=s.device)  # dtypes stay as loaded: PEFT keeps LoRA weights of a bf16/fp16 base in float32
    # on the device: one read of the weights at its memory bandwidth
    check_finite_parameters(model, model_dir if adapter_dir is None else f"{model_dir} with the adapter {adapter_dir}")
    if torch_dtype == torch.float64:
        exact_float64_norms(model)
    model.eval()
    return model, tokenizer


def toy_policy(cfg: Any = None, root: str | Path | None = None, **load_kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """The built-in toy world's policy and tokenizer: builds it once (cached), then :func:`load_policy`.

    Args:
        cfg: a :class:`probe.toy.ToyWorldConfig` (default config when None).
        root: cache root (default ``$PROBE_CACHE`` or ``~/.cache/probe``).
        **load_kwargs: passed to :func:`load_policy` (dtype, attn_implementation, lora, device, ...).
    """
    from probe.toy.world import build_toy_world

    return load_policy(build_toy_world(cfg, root=root), **load_kwargs)


def context_length(policy: Any) -> int | None:
    """The longest sequence the policy was made for: ``max_position_embeddings`` times the RoPE scaling factor of
    YaRN / linear / dynamic scaling when the config keeps the original length there (``rope_scaling`` of
    transformers 4, ``rope_parameters`` of 5); None when the config names none (then nothing is checked)."""
    config = getattr(policy, "config", None)  # a PeftModel forwards to its base's
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int):
        return None
    for key in ("rope_scaling", "rope_parameters"):
        scaling = getattr(config, key, None)
        if isinstance(scaling, dict) and isinstance(scaling.get("factor"), (int, float)) and scaling["factor"] > 1:
            original = scaling.get("original_max_position_embeddings")
            if original is None or original == length:  # the config holds the original length: scale it
                return int(length * scaling["factor"])
    return length


# ---------------------------------------------------------------------------------------------
# a Lightning checkpoint as the policy's weights


class LightningCheckpointError(ValueError):
    """A Lightning checkpoint that cannot give the policy's weights (the message names why and the fix)."""


def lightning_checkpoint(path: Path) -> Path | None:
    """``path`` when it is a Lightning checkpoint: a ``.ckpt`` file, or the ``.ckpt`` directory (a distributed
    checkpoint) ``ModelParallelStrategy`` writes; None otherwise."""
    if path.is_file() and path.suffix == ".ckpt":
        return path
    if path.is_dir() and (path / ".metadata").is_file() and not (path / "config.json").is_file():
        return path
    return None


def _lightning_state(path: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights a Lightning checkpoint holds for ``model`` (keyed like ``model.state_dict()``: the training
    module's attribute prefix, e.g. ``policy.``, stripped) and its ``global_step`` (None when it has none)."""
    from probe.optim_loading import _load_weights_only, checkpoint_entries, load_checkpoint

    wanted = model.state_dict()
    if path.is_file():
        saved = _load_weights_only(path)
        state = saved.get("state_dict") if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            raise LightningCheckpointError(f"{path} holds no 'state_dict'; it is not a Lightning checkpoint")
        step = saved.get("global_step")
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    else:
        entries = checkpoint_entries(path)
        shapes = {
            k.removeprefix("state_dict."): tuple(getattr(v, "size", ()))
            for k, v in entries.items()
            if k.startswith("state_dict.")
        }
        state, step = None, None
        meta = path / "meta.pt"
        if meta.is_file():
            extra = _load_weights_only(meta)
            step = extra.get("global_step") if isinstance(extra, dict) else None
    keys = list(shapes)
    prefix = _common_prefix(keys, list(wanted))
    wrong = [k for k in wanted if prefix is not None and shapes[prefix + k] != tuple(wanted[k].shape)]
    if wrong:
        k = wrong[0]
        raise LightningCheckpointError(
            f"the weights in {path} do not match the model of policy.config_path: {k} is saved with shape "
            f"{shapes[prefix + k]} but that config makes it {tuple(wanted[k].shape)} ({len(wrong)} such tensors). "
            "Fix: set policy.config_path to the directory of the model this run trained"
        )
    if prefix is None:
        adapters = [k for k in keys if "lora_" in k]
        why = (
            " It holds LoRA adapter weights: export the adapter with peft_model.save_pretrained(dir) and pass the base "
            "model as policy.path with policy.adapter_path: dir."
            if adapters
            else ""
        )
        raise LightningCheckpointError(
            f"the weights in {path} do not match the model of policy.config_path ({len(keys)} tensors such as "
            f"{keys[:2]}; the model has {len(wanted)} such as {list(wanted)[:2]}).{why} Fix: set policy.config_path "
            "to the directory of the model this run trained, or export the policy with model.save_pretrained(dir) "
            "and pass that directory as policy.path"
        )
    if state is None:  # a distributed checkpoint: read the policy's tensors whole, on this rank alone
        template = {f"state_dict.{prefix}{k}": torch.empty_like(v) for k, v in wanted.items()}
        load_checkpoint(path, template)
        return {k: template[f"state_dict.{prefix}{k}"] for k in wanted}, step
    return {k: state[prefix + k] for k in wanted}, step


def _common_prefix(keys: list[str], wanted: list[str]) -> str | None:
    """The prefix that, put before each of ``wanted``, names an entry of ``keys`` for all of them (None if none)."""
    have = set(keys)
    if not wanted:
        return None
    first = wanted[0]
    for key in keys:
        if key.endswith(first):
            prefix = key[: len(key) - len(first)]
            if all(prefix + k in have for k in wanted):
                return prefix
    return None


def _model_from_lightning_checkpoint(path: Path, config_dir: Path, dtype: torch.dtype, s: PolicySettings) -> Any:
    """The architecture of ``config_dir`` with the weights of the Lightning checkpoint ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True, trust_remote_code=s.trust_remote_code)
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation=s.attn_implementation, trust_remote_code=s.trust_remote_code
    )
    state, step = _lightning_state(path, model)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.probe_checkpoint_step = step  # the step the weights were saved at (checked against the optimizer's)
    log.info("policy weights: %s (global_step %s), architecture and tokenizer: %s", path, step, config_dir)
    return model


def policy_step(policy: torch.nn.Module, settings: PolicySettings) -> tuple[int | None, str]:
    """The training step the policy's weights were saved at, and where that was read: a Lightning checkpoint's
    ``global_step``, or the ``probe_fit.json`` that ``GRPOModule`` writes beside an exported policy; None if
    neither tells."""
    import json

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    step = getattr(base, "probe_checkpoint_step", None)
    if step is not None:
        return int(step), f"{settings.path} global_step"
    record = settings.directory() / "probe_fit.json"
    if record.is_file():
        try:
            value = json.loads(record.read_text()).get("global_step")
        except (json.JSONDecodeError, OSError):
            value = None
        if isinstance(value, int):
            return value, f"{record} global_step"
    return None, ""
