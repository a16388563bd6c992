"""Load a model and its tokenizer from a built-in name, a local folder, a .gguf file, the Hugging Face cache or
the hub, and say how long a sequence the model can take.

With `method: qlora` the model's linear layers load as 4-bit NF4 with double quantisation
(bitsandbytes): about 0.5 bytes a weight instead of 4 (fp32) or 2 (bf16), at the cost of
dequantising each weight on every forward and backward pass.  Where 4-bit cannot run,
`qlora.fallback` decides between plain LoRA on the unquantised weights and a stop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from difflib import get_close_matches
from itertools import islice
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants

from tunesmith.config import Config, ModelConfig
from tunesmith.errors import UserError
from tunesmith.hardware import four_bit_status
from tunesmith.models.builtin import BUILTIN_MODELS, builtin_path, convert_gguf_once, tunesmith_home
from tunesmith.models.tasks import auto_model_class, detect_task

log = logging.getLogger(__name__)


def gguf_cached_path(gguf_file: Path) -> Path:
    """A user's .gguf file, dequantised once into a cached safetensors folder (keyed by path, size, mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = tunesmith_home() / "models" / f"gguf-{gguf_file.stem}-{key}"

    def converted(folder: Path) -> bool:
        return (folder / "config.json").is_file()

    if not converted(target):
        convert_gguf_once(gguf_file, target, converted)
    return target


def resolve_model_source(name: str, key: str = "model.name") -> str:
    """Turn `model.name` (or the config key `key` naming a model) into something `from_pretrained` reads: a local
    folder or a hub id.

    Tried in this order, and only the last step touches the network: a built-in name (it wins over a folder of
    the same name in the working directory; write ./NAME for that), an existing path (a folder holding
    config.json, a .gguf file), a model in the local Hugging Face cache (read from its snapshot folder, so no
    request is made), and last the hub, for a name shaped owner/name, when the hub is not switched off
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and answers one question within HUB_PROBE_S seconds.  Any other
    name is a sentence at once, with the nearest built-in or cached name when one is close."""
    if not name.strip():
        raise UserError(f"{key} is empty; give a built-in model (`tunesmith models` lists them), a folder holding "
                        "config.json, a .gguf file, or a hub id as owner/name.")
    if name in BUILTIN_MODELS:
        return str(builtin_path(name))
    path = Path(name).expanduser()
    if _exists(path):
        return _local_source(path, name, key)
    if _looks_like_path(name):
        raise UserError(f"{key}: {name} does not exist (no folder or file at {path.absolute()}); check the path"
                        f".{_did_you_mean(_nearest_sibling(name, path))}")
    snapshot = _cached_snapshot(name)
    if snapshot is not None and _has_weights(snapshot):
        return str(snapshot)
    if not _is_hub_id(name):
        close = _nearest_known(name)
        raise UserError(
            f"{key}: {name} is not a built-in model, a local folder or file, or a model in the Hugging Face cache; "
            + (f"did you mean {close}? (`tunesmith models` lists the built-in ones)" if close else
               "give a built-in model (`tunesmith models` lists them), a folder holding config.json, a .gguf file, "
               "or a hub id as owner/name (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).")
        )
    if _hub_offline():
        partly = " holds only part of it (config.json, no weights)" if snapshot is not None else " does not hold it"
        raise UserError(
            f"{key}: {name} is a hub id, but the Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
            f"{partly} and the hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); unset it to "
            f"download the model, or set {key} to a local folder.{_did_you_mean(_nearest_known(name))}"
        )
    _check_on_hub(name, key)
    return name  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct; transformers downloads it into the cache


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to be a path (ENAMETOOLONG) is no path
        return False


def _local_source(path: Path, name: str, key: str) -> str:
    """An existing folder or file as a source `from_pretrained` reads, or the sentence that says why it is none."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "config.yaml").is_file():
            trained = path / "model"  # a full fine-tune's weights; an adapter run has adapter/ instead
            if (trained / "config.json").is_file():
                todo = f"set {key} to {trained}, the model it trained"
            else:
                todo = f"merge its adapter into its base first (`tunesmith merge {name} --out DIR`) and set {key} to DIR"
            raise UserError(f"{key}: {name} is a tunesmith run folder, not a model folder; {todo}.")
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            raise UserError(f"{key}: the folder {name} has no config.json but holds {ggufs[0].name}; set {key} to "
                            f"that file ({ggufs[0]}).")
        raise UserError(
            f"{key}: the folder {name} has no config.json, so it is not a Hugging Face model folder; point it at the "
            "folder that holds config.json and the weights."
        )
    if path.suffix.lower() == ".gguf":
        try:
            with path.open("rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise UserError(f"{key}: cannot read {name} ({exc.strerror}); check its permissions.") from None
        if magic != b"GGUF":  # every GGUF file starts with these 4 bytes (ggml's docs/gguf.md)
            raise UserError(f"{key}: {name} does not start with the GGUF magic bytes, so it is not a GGUF model "
                            "file (a partial download, or another format renamed?); download the .gguf file again.")
        return str(gguf_cached_path(path))
    raise UserError(
        f"{key}: {name} is a file but not a .gguf file; set {key} to the folder that holds config.json and the "
        "weights, or to a .gguf file."
    )


def _looks_like_path(name: str) -> bool:
    """A name meant as a path: ./x, ../x, /x, ~/x, a .gguf file, or separators that do not make owner/name."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name.lower().endswith(".gguf"):
        return True
    separators = {os.sep, os.altsep or os.sep, "/"}
    return any(sep in name for sep in separators) and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    """owner/name, with the characters and length huggingface_hub's validate_repo_id allows (it also accepts a bare
    name, which on the hub only old ids such as gpt2 use; those resolve only from the cache here)."""
    return name.count("/") == 1 and _valid_repo_id(name)


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(name: str) -> Path | None:
    """The snapshot folder of `name`'s main revision in the local Hugging Face cache, where its config.json is
    cached (huggingface_hub's try_to_load_from_cache: models--owner--name/refs/main names the snapshot)."""
    if not _valid_repo_id(name):
        return None
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _has_weights(folder: Path) -> bool:
    """Whether a cached snapshot holds weights (one file or the index of shards), not only a config.json that
    AutoConfig fetched."""
    return any(next(folder.glob(pattern), None) for pattern in ("model*.safetensors*", "pytorch_model*.bin*"))


def _cached_model_ids() -> list[str]:
    """The model ids in the local Hugging Face cache, read from its folder names (models--owner--name, the layout
    of huggingface_hub's repo_folder_name; "--" cannot occur inside an id, so the names read back exactly)."""
    try:
        entries = os.listdir(hub_constants.HF_HUB_CACHE)
    except OSError:
        return []
    return [entry.removeprefix("models--").replace("--", "/") for entry in entries if entry.startswith("models--")]


def _nearest_known(name: str) -> str | None:
    """The built-in or cached model name closest to `name` (difflib, ignoring case), if one is close."""
    known = {known.lower(): known for known in (*BUILTIN_MODELS, *_cached_model_ids()) if known != name}
    close = get_close_matches(name.lower(), list(known), n=1)
    return known[close[0]] if close else None


def _nearest_sibling(name: str, path: Path) -> str | None:
    """`name` with its last part replaced by the closest entry of the folder it points into, if one is close."""
    try:
        siblings = [entry.name for entry in islice(path.parent.iterdir(), 5000)]
    except OSError:
        return None
    close = get_close_matches(path.name, siblings, n=1)
    if not close:
        return None
    stem = name.rstrip("/\\")
    return stem[: len(stem) - len(path.name)] + close[0]


def _did_you_mean(suggestion: str | None) -> str:
    return f" Did you mean {suggestion}?" if suggestion else ""


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true value,
    read now (huggingface_hub reads them once, at import)."""
    return hub_constants.HF_HUB_OFFLINE or any(
        os.environ.get(variable, "").upper() in hub_constants.ENV_VARS_TRUE_VALUES
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


HUB_PROBE_S = 2.0  # the longest the hub gets to answer whether a model is there, DNS included; no retries


def ask_hub(ask, seconds: float = HUB_PROBE_S) -> tuple[bool, BaseException | None]:
    """Run one hub question `ask()` in a thread and wait at most `seconds`: (whether it answered, the exception it
    raised or None).  A thread, because a request's own timeout does not bound the DNS lookup."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            ask()
        except Exception as exc:  # sorted into a sentence by the caller
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="tunesmith-hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome), (outcome[0] if outcome else None)


def _check_on_hub(repo_id: str, key: str) -> None:
    """Ask the hub once for `repo_id`'s config.json (a HEAD request), so that a wrong id, a gated model or an
    unreachable hub is a sentence within HUB_PROBE_S seconds, not after transformers' retries."""
    answered, exc = ask_hub(lambda: huggingface_hub.get_hf_file_metadata(
        huggingface_hub.hf_hub_url(repo_id, "config.json"), timeout=HUB_PROBE_S, retry_on_errors=False))
    if answered and exc is None:
        return
    raise UserError(_hub_failure(repo_id, key, exc))


def _hub_failure(repo_id: str, key: str, exc: BaseException | None) -> str:
    """The sentence for a failed hub question (`exc` None: no answer in time)."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    download = f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and set {key} to DIR"
    if isinstance(exc, GatedRepoError):  # (a kind of RepositoryNotFoundError, so asked first)
        return (f"{key}: {repo_id} is a gated model on the Hugging Face hub; accept its terms at "
                f"https://huggingface.co/{repo_id}, log in with `hf auth login` (or set HF_TOKEN), and run again.")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{key}: {repo_id} is not a model on the Hugging Face hub (or it is private and this machine is not "
                f"logged in: `hf auth login`); check the id.{_did_you_mean(_nearest_known(repo_id))}")
    if isinstance(exc, DisabledRepoError):
        return f"{key}: {repo_id} has been disabled on the Hugging Face hub; choose another model."
    if isinstance(exc, EntryNotFoundError):
        return (f"{key}: {repo_id} on the Hugging Face hub has no config.json, so transformers cannot load it; if it "
                f"holds a .gguf file, download that (`hf download {repo_id} FILE.gguf --local-dir DIR`) and set {key} "
                "to the file.")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        return f"{key}: the Hugging Face hub answered {status} when asked for {repo_id}; try again later, or {download}."
    reason = f"no answer within {HUB_PROBE_S:g} s" if exc is None else f"{type(exc).__name__}: {_first_line(exc)}"
    return (f"{key}: {repo_id} is not in the local Hugging Face cache and the hub could not be reached ({reason}); "
            f"check the network, or {download}.{_did_you_mean(_nearest_known(repo_id))}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def load_tokenizer(source: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise UserError(_unreadable(source, cfg, exc)) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_task(source: str, cfg: Config) -> str:
    """`model.task` for this model: as configured, or (auto) from its config.json (see tunesmith.models.tasks)."""
    from transformers import AutoConfig


    if cfg.model.task != "auto":
        return cfg.model.task
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        model_config = None  # load_model reports what is wrong with the source
    return detect_task(model_config)


def load_model(source: str, cfg: Config, dtype: torch.dtype, task: str = "causal_lm", for_training: bool = True):
    """The model for `cfg.method` and `task`; `dtype` is the precision it computes in (and stores unquantised
    weights in).  `for_training=False` (inference only) lets bitsandbytes use its CPU inference kernel."""

    extra = {}
    if cfg.method == "qlora":
        quantization = four_bit_config(cfg, dtype)
        if quantization is not None:
            extra["quantization_config"] = quantization
    try:
        model = auto_model_class(task).from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, low_cpu_mem_usage=True, **extra
        )
    except OSError as exc:
        raise UserError(_unreadable(source, cfg.model, exc)) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {cfg.model.name} needs Python code shipped with the model; if you trust it, "
                "set model.trust_remote_code: true."
            ) from None
        raise
    if "quantization_config" in extra:
        _release_checkpoint_map(model)
        if for_training:
            _keep_four_bit_trainable(model)
    return model


def _keep_four_bit_trainable(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel in a model that trains.

    On CPUs with AVX512-BF16 (bitsandbytes 0.50, `Linear4bit.forward`), the first forward of a 4-bit layer in
    eval mode without gradients converts its weight, in place and for good, to a layout for a kernel that has
    no backward.  A run evaluates between steps, so every later step would lose the gradient that flows through
    the frozen 4-bit weights to the adapters beneath them (and a layer with a bias fails outright).  Inference
    loads (`for_training=False`: chat, serve, merge, the distillation teacher) keep the faster kernel."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _release_checkpoint_map(model) -> None:
    """Copy the unquantised CPU tensors (embeddings, norms, output layer) out of the checkpoint file's memory
    map.  They are views of that map, and while one view lives the whole map stays resident, holding every
    weight that quantisation read: about 4 bytes a weight, more than the 4-bit model itself."""
    from bitsandbytes.nn import Params4bit

    with torch.no_grad():
        for param in model.parameters():  # tied weights are one parameter, copied once
            if param.device.type == "cpu" and not isinstance(param, Params4bit):
                param.data = param.data.clone()


def four_bit_config(cfg: Config, dtype: torch.dtype):
    """bitsandbytes' NF4 + double-quantisation settings, computing in `dtype`; None where 4-bit cannot run here
    and `qlora.fallback: lora` (the reason is reported), a UserError where `qlora.fallback: error`."""
    available, detail = four_bit_status()
    if not available:
        reason = detail.rstrip(".")
        if cfg.qlora.fallback == "error":
            raise UserError(
                f"method: qlora needs 4-bit (NF4) quantisation, which cannot run here: {reason}. "
                "Install bitsandbytes (pip install 'bitsandbytes>=0.50,<0.51', the range tunesmith is tested with; it "
                "runs on CPUs too), or train with method: lora, or set qlora.fallback: lora to do that by itself."
            )
        log.info(
            f"method: qlora: 4-bit cannot run here ({reason}); training plain LoRA on the unquantised weights "
            "instead, which needs more memory (qlora.fallback: error stops instead)."
        )
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat: levels at the quantiles of a normal distribution
        bnb_4bit_use_double_quant=True,  # the per-block scales are quantised too: ~0.37 bits a weight saved
        bnb_4bit_compute_dtype=dtype,  # weights are dequantised to this for each matmul
    )


def _unreadable(source: str, cfg: ModelConfig, exc: Exception) -> str:
    if Path(source).is_dir():
        return f"model.name: could not read the model in {source} ({exc}); check that the folder is complete."
    # resolve_model_source hands out a hub id only after the hub answered for it, so the download itself failed
    return (
        f"model.name: downloading {cfg.name} from the Hugging Face hub failed ({_first_line(exc)}); check the "
        f"network and run again, or download it where the hub is reachable (`hf download {cfg.name} --local-dir "
        "DIR`) and set model.name to DIR."
    )


# Families whose attention places tokens by relative position, so no length is out of range (only slower and
# hungrier); T5's own old config.json files still carry an `n_positions: 512` that bounds nothing.
_NO_HARD_CONTEXT = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}
# config.json keys for the most positions a model has embeddings (or a trained window) for: Llama, Mistral, Qwen,
# Gemma, Phi, BERT, BART... (max_position_embeddings), GPT-2/GPT-J (n_positions, older files n_ctx), MPT
# (max_seq_len), ChatGLM (seq_length).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_length(source: str) -> int | None:
    """The longest sequence, in tokens, the model at `source` (what resolve_model_source returned) takes: read from
    its config.json, or from a multimodal model's text_config.  A RoPE scaling that stretches an original window
    (YaRN as Qwen2.5 documents it: `original_max_position_embeddings` x `factor`) counts; configs that already
    give the stretched length (Llama 3.1, Gemma 3) are read as written.  None where the family has no hard limit
    (relative positions: T5; dynamic RoPE scaling), the config names none, or config.json cannot be read (for a
    hub id it is read from the Hugging Face cache, where loading the tokenizer or the model puts it)."""
    config = _read_config_json(source)
    if config is None:
        return None
    if not any(key in config for key in _CONTEXT_KEYS) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if config.get("model_type") in _NO_HARD_CONTEXT:
        return None
    limit = next((config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    if limit is None:
        return None
    rope = config.get("rope_parameters") or config.get("rope_scaling")  # (transformers 5 writes rope_parameters)
    if isinstance(rope, dict):
        if (rope.get("rope_type") or rope.get("type")) == "dynamic":
            return None  # dynamic NTK scaling rescales to whatever length comes
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")
        if isinstance(factor, (int, float)) and isinstance(original, int):
            limit = max(limit, int(original * factor))
    return limit


def _read_config_json(source: str) -> dict | None:
    path = Path(source) / "config.json"
    if not path.is_file():
        cached = huggingface_hub.try_to_load_from_cache(source, "config.json") if _valid_repo_id(source) else None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model says what is wrong with it
    return config if isinstance(config, dict) else None


def check_max_length(cfg: Config, source: str) -> None:
    """Refuse a `data.max_length` longer than the model at `source` takes (see context_length)."""
    limit = context_length(source)
    if limit is not None and cfg.data.max_length > limit:
        raise UserError(
            f"data.max_length: {cfg.data.max_length} is longer than {cfg.model.name}'s context of {limit} tokens; "
            f"set data.max_length to {limit} or less."
        )
