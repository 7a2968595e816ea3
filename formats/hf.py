"""Hugging Face model folders: config.json, and weights in safetensors shards (through
model.safetensors.index.json) or pytorch_model*.bin; the tokenizer's files beside them.

Supported: the model_types of models.FAMILIES (LLaMA 1/2/3.x, Code Llama, TinyLlama,
SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3, Phi-3/3.5/4-mini, GPT-2). config.json is
read in both the classic layout (rope_theta, rope_scaling) and transformers 5's
(rope_parameters); each family's names come from its table (models/).

Hugging Face stores each head's query and key rows with the two halves of every
RoPE pair apart (its rotate_half RoPE); for LLaMA this toolkit keeps Meta's interleaved
order, so those rows are put back as they are read (the table's rope_heads says which).
GPT-2's checkpoints hold its linears' weights as Conv1D, [in, out]: transposed as they are read
and written (the table's hf_transposed).
"""

import math
import os
import shutil

from utils import UserError, read_json

from models import FAMILIES, checked_shapes, family, hook, names_of
from formats.safetensors import SafetensorsFile
from formats.torch_files import dtype_name, load_state_dict, to_mx

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The tokenizer's files, copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved RoPE's frequencies: not a weight


def detect(folder):
    return (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "config.json"))
            and any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_INDEXES + WEIGHT_FILES))


class Checkpoint:
    """An opened, fully checked Hugging Face folder (see formats/__init__.py)."""

    def __init__(self, folder):
        self.path = folder
        config_path = os.path.join(folder, "config.json")
        hf = read_json(config_path, "config.json")
        self.config = model_config(hf, config_path)
        self.config.update(tokenizer_config(folder, hf))
        self.shapes = checked_shapes(self.config, config_path)
        self.table = names_of(self.config)
        self.files = weight_files(folder)  # {hf name: file}
        self.names = self._our_names()  # {our name: hf name}
        self._check_shapes()

    def _our_names(self):
        names = {}
        of = family(self.config)
        base = getattr(of, "HF_BASE_PREFIX", None)  # GPT-2's checkpoints saved without it
        for hf_name, file in self.files.items():
            ours = self.table.rename(hf_name, "hf", "ours")
            if ours is None and base is not None:
                ours = self.table.rename(base + hf_name, "hf", "ours")
            if ours is None:
                if not hf_name.endswith(IGNORED_SUFFIXES + getattr(of, "HF_IGNORED", ())):
                    raise UserError(f"{file.path}: unexpected tensor '{hf_name}' (not a weight of a "
                                    f"{self.config.get('model_type', 'llama')} model)")
                continue
            if ours == "output.weight" and self.config["tie_word_embeddings"]:
                continue  # some tied checkpoints save the embedding twice
            names[ours] = hf_name
        for key in self.shapes:
            if key not in names:
                raise UserError(f"{self.path}: no tensor '{self.table.rename(key, 'ours', 'hf')}' in the weights "
                                "(expected from config.json)")
        return names

    def _check_shapes(self):
        for key, shape in self.shapes.items():
            hf_name = self.names[key]
            file = self.files[hf_name]
            got, dtype = file.shape_and_dtype(hf_name)
            shape = hf_shape(key, self.table.weight(key), shape)
            if tuple(got) != shape:
                raise UserError(f"{file.path}: {hf_name} has shape {tuple(got)}, expected {shape} from "
                                "config.json")
            if dtype is None:
                raise UserError(f"{file.path}: {hf_name} is not a float tensor")

    def stored_dtype(self, key):
        return self.files[self.names[key]].shape_and_dtype(self.names[key])[1]

    def tensor(self, key):
        hf_name, weight = self.names[key], self.table.weight(key)
        w = self.files[hf_name].array(hf_name)
        return our_rows(w.T if transposed(key, weight) else w, weight, self.config)

    def quantization(self, key):
        return None  # Hugging Face folders hold floats here

    def quantized(self, key):
        raise AssertionError("Hugging Face checkpoints are read as floats")

    def write_tokenizer(self, folder):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(folder, name))
        template = chat_template(self.path)
        if template is not None:
            with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(template)


def transposed(key, weight):
    """Whether Hugging Face holds tensor `key` of `weight` transposed: GPT-2's Conv1D weights, [in, out]
    (not their biases)."""
    return weight.hf_transposed and key.endswith(".weight")


def hf_shape(key, weight, shape):
    """Tensor `key`'s shape (ours) as Hugging Face holds it."""
    return tuple(shape)[::-1] if transposed(key, weight) else tuple(shape)


def our_rows(w_O_, weight, config):
    """A Hugging Face weight's rows [out, ...] in this toolkit's order: the queries' and keys'
    rows of each head in Meta's, RoPE pairs interleaved; Hugging Face keeps the pairs' halves
    apart, [h, 2, H/2, ...] -> [h, H/2, 2, ...]."""
    if weight.rope_heads is None:
        return w_O_
    heads = config[weight.rope_heads]
    return w_O_.reshape(heads, 2, -1, *w_O_.shape[1:]).swapaxes(1, 2).reshape(w_O_.shape)


def hf_rows(w_O_, weight, config):
    """The inverse: this toolkit's rows [out, ...] in Hugging Face's order, [h, H/2, 2, ...] -> [h, 2, H/2, ...]."""
    if weight.rope_heads is None:
        return w_O_
    heads = config[weight.rope_heads]
    return w_O_.reshape(heads, -1, 2, *w_O_.shape[1:]).swapaxes(1, 2).reshape(w_O_.shape)


# ----------------------------------------------------------------------------- config.json

def model_config(hf, path):
    """This toolkit's config from a Hugging Face config.json: the keys every family has (under the
    names its HF_ALIASES gives: GPT-2's n_embd, ...), then the family's own (its from_hf)."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        shown = kind or (hf.get("architectures") or ["?"])[0]
        raise UserError(f"{path}: architecture {str(shown)[:100]!r} is not supported (supported: "
                        f"{', '.join(FAMILIES)})")
    # The family's own names win over stray shared ones (GPT-2 reads n_inner, never intermediate_size)
    hf = {**hf, **{ours: hf[theirs] for ours, theirs in getattr(FAMILIES[kind], "HF_ALIASES", {}).items()
                   if theirs in hf}}
    for key, value in FAMILIES[kind].HF_CONSTANTS.items():
        if hf.get(key, value) != value:
            raise UserError(f"{path}: {key!r} is {str(hf[key])[:100]!r}: a {kind} model here has {value!r}")
    rope = hf.get("rope_parameters") or {}  # transformers 5 puts rope_theta and the scaling here
    dim, n_heads = _number(hf, "hidden_size", path), _number(hf, "num_attention_heads", path)
    config = {"dim": dim, "n_layers": _number(hf, "num_hidden_layers", path), "n_heads": n_heads,
              "n_kv_heads": _number(hf, "num_key_value_heads", path, default=n_heads),
              "head_dim": _number(hf, "head_dim", path, default=dim // n_heads),
              "hidden_dim": _number(hf, "intermediate_size", path, default=None),  # GPT-2's from_hf defaults it
              "norm_eps": _number(hf, "rms_norm_eps", path, float, default=1e-6),
              "vocab_size": _number(hf, "vocab_size", path),
              "rope_theta": _number(rope if "rope_theta" in rope else hf, "rope_theta", path, float, default=10000.0),
              "sliding_window": _number(hf, "sliding_window", path, default=None) if kind == "mistral" else None,
              "context_length": _number(hf, "max_position_embeddings", path, default=None),
              "tie_word_embeddings": hf.get("tie_word_embeddings", False)}  # checked as a boolean
    if FAMILIES[kind] is not FAMILIES["llama"]:  # LLaMA's folders never said
        config["model_type"] = kind
    config.update(hook(FAMILIES[kind], "from_hf")(hf, path))
    if config["hidden_dim"] is None:
        raise UserError(f"{path}: missing 'intermediate_size'")
    scaling = rope_scaling(hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
                           path, hf)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def rope_scaling(scaling, path, hf):
    """Hugging Face's RoPE scaling (of config.json `hf`) as this toolkit's, or None for none; others
    refused by name."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": scaling.get("factor")}
    if kind == "llama3":
        return {"rope_type": "llama3", **{k: scaling.get(k) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    if kind in ("longrope", "su"):  # su: Phi-3's first configs' name for it
        return longrope_scaling(scaling, path, hf)
    raise UserError(f"{path}: rope scaling '{kind}' is not supported (supported: llama3, linear, longrope)")


def longrope_scaling(scaling, path, hf):
    """LongRoPE as transformers reads it: Phi-3's original_max_position_embeddings at the top (else
    the scaling's), and the turned dims' scale the scaling gives, else the one of the factor it
    gives, else of max_position_embeddings / original (all Phi-3's configs say)."""
    original = (_number(hf, "original_max_position_embeddings", path, default=None)
                or _number(scaling, "original_max_position_embeddings", path))
    attention = _number(scaling, "attention_factor", path, float, default=None)
    if attention is None:
        factor = (_number(scaling, "factor", path, float, default=None)
                  or _number(hf, "max_position_embeddings", path) / original)
        attention = longrope_attention(factor, original)
    return {"rope_type": "longrope", "short_factor": scaling.get("short_factor"),
            "long_factor": scaling.get("long_factor"), "original_max_position_embeddings": original,
            "attention_factor": attention}


def longrope_attention(factor, original):
    """LongRoPE's scale of the turned dims for a context `factor` times the original (transformers',
    llama.cpp's converter's); 1 where the original context is a single position."""
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 and original > 1 else 1.0


def _number(config, key, path, kind=int, default=...):
    value = config.get(key)
    if value is None:
        if default is ...:
            raise UserError(f"{path}: missing '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise UserError(f"{path}: '{key}' must be a positive {'number' if kind is float else 'integer'}, "
                        f"got {value!r}")
    return kind(value)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_config(folder, hf):
    """BOS, end tokens and whether BOS is added, from config.json, generation_config.json
    and tokenizer_config.json (later files win, as transformers reads them)."""
    out = {}
    generation = _optional_json(os.path.join(folder, "generation_config.json"))
    for source in (hf, generation):
        if isinstance(source.get("bos_token_id"), int):
            out["bos_token_id"] = source["bos_token_id"]
        ends = source.get("eos_token_id")
        if isinstance(ends, int) or (isinstance(ends, list) and all(isinstance(e, int) for e in ends)):
            out["eos_token_ids"] = [ends] if isinstance(ends, int) else list(ends)
    tok_config = _optional_json(os.path.join(folder, "tokenizer_config.json"))
    eos = _added_token_id(folder, tok_config.get("eos_token"))
    if eos in out.get("eos_token_ids", []):
        # the tokenizer's own eos_token first (Phi-3's <|endoftext|>, listed last in generation_config.json):
        # the eos_id a chat template writes as eos_token, as transformers and llama.cpp take it
        out["eos_token_ids"].remove(eos)
        out["eos_token_ids"].insert(0, eos)
    if isinstance(tok_config.get("add_bos_token"), bool):
        out["add_bos_token"] = tok_config["add_bos_token"]
    elif "bos_token_id" in out:
        out["add_bos_token"] = _adds_bos(folder, out["bos_token_id"])
    return out


def _added_token_id(folder, token):
    """The id tokenizer.json's added tokens give `token` (tokenizer_config.json's text, or its
    {"content": text}), or None."""
    text = token.get("content") if isinstance(token, dict) else token
    if not isinstance(text, str):
        return None
    added = _optional_json(os.path.join(folder, "tokenizer.json")).get("added_tokens")
    return next((t.get("id") for t in added if isinstance(t, dict) and t.get("content") == text), None) \
        if isinstance(added, list) else None


def _adds_bos(folder, bos_id):
    """Without a word from tokenizer_config.json: a SentencePiece LLaMA tokenizer adds BOS, and
    a tokenizer.json whose post-processor template starts with it does."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return os.path.isfile(os.path.join(folder, "tokenizer.model"))
    post = _optional_json(path).get("post_processor") or {}
    for processor in post.get("processors") or [post]:  # a Sequence of processors, or one
        first = (processor.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
        if bos_id in (processor.get("special_tokens") or {}).get(first, {}).get("ids", []):
            return True
    return False


def chat_template(folder):
    """The chat template of a Hugging Face folder: chat_template.jinja, or tokenizer_config.json's."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = _optional_json(os.path.join(folder, "tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def _optional_json(path):
    return read_json(path, os.path.basename(path)) if os.path.isfile(path) else {}


# ----------------------------------------------------------------------------- weights

def weight_files(folder):
    """{Hugging Face tensor name: the opened file that holds it}, through an index if there is one."""
    for index in WEIGHT_INDEXES:
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            weight_map = read_json(path, index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{path}: no 'weight_map' of tensor names to files")
            opened = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(folder, shard)
                if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
                    raise UserError(f"{path}: names the shard '{shard}', which is not in {folder}")
                opened[shard] = WeightFile(shard_path)
            files = {}
            for name, shard in weight_map.items():
                if name not in opened[shard].names:
                    raise UserError(f"{path}: says {name} is in {shard}, which does not hold it")
                files[name] = opened[shard]
            return files
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            file = WeightFile(path)
            return {tensor: file for tensor in file.names}
    raise UserError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)} or an index)")


class WeightFile:
    """One safetensors or PyTorch weights file: names, shapes and float types, and mx arrays."""

    def __init__(self, path):
        self.path = path
        if path.endswith(".safetensors"):
            self._st, self._sd = SafetensorsFile(path), None
            self.names = set(self._st.tensors)
        else:
            self._st, self._sd = None, load_state_dict(path)
            self.names = set(self._sd)

    def shape_and_dtype(self, name):
        if self._st is not None:
            dtype, shape = self._st.tensors[name]
            return shape, dtype
        tensor = self._sd[name]
        return tuple(tensor.shape), dtype_name(tensor)

    def array(self, name):
        return self._st.array(name) if self._st is not None else to_mx(self._sd[name])



# ----------------------------------------------------------------------------- writing

SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained shards by default


def shard_plan(sizes, shard_bytes=SHARD_BYTES):
    """{shard file name: [tensor names]}: the tensors of `sizes` ({name: bytes}) in order, a new
    shard whenever the next would take one past `shard_bytes` (a bigger tensor stands alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards)}


def write(checkpoint, folder, dtype):
    """Write `checkpoint` (any format's) as a Hugging Face folder in `dtype`: config.json with
    the classic keys released checkpoints carry, safetensors shards and their index, the
    tokenizer's files with the chat template, the query and key rows in Hugging Face's order.
    transformers' AutoModelForCausalLM and AutoTokenizer load it as it is."""
    import mlx.core as mx

    from formats.safetensors import write_file

    config = checkpoint.config
    out_dtype = getattr(mx, dtype)
    table = names_of(config)
    names = {key: table.rename(key, "ours", "hf") for key in checkpoint.shapes}

    def hf_tensor(key):
        w = hf_rows(checkpoint.tensor(key), table.weight(key), config)
        return (w.T if transposed(key, table.weight(key)) else w).astype(out_dtype)

    weight_map = {}
    sizes = {key: math.prod(shape) * out_dtype.size for key, shape in checkpoint.shapes.items()}
    for shard, keys in shard_plan(sizes).items():
        write_file(os.path.join(folder, shard),
                   [(names[k], out_dtype, hf_shape(k, table.weight(k), checkpoint.shapes[k])) for k in keys],
                   (hf_tensor(k) for k in keys))
        weight_map.update({names[k]: shard for k in keys})
    total = sum(math.prod(s) * out_dtype.size for s in checkpoint.shapes.values())
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(folder, "config.json"), hf_config(config, dtype))
    ends = config.get("eos_token_ids") or []
    _write_json(os.path.join(folder, "generation_config.json"),
                {"bos_token_id": config.get("bos_token_id"), "eos_token_id": ends[0] if len(ends) == 1 else ends})
    write_tokenizer_files(checkpoint, folder)


def hf_config(config, dtype):
    """config.json as transformers 4 and 5 both read it (rope_theta and rope_scaling at the top)."""
    kind = config.get("model_type") or ("mistral" if config.get("sliding_window") else "llama")
    ends = config.get("eos_token_ids") or []
    out = {"architectures": [family(config).HF_CLASSES[kind]],
           "model_type": kind, "hidden_size": config["dim"], "num_hidden_layers": config["n_layers"],
           "num_attention_heads": config["n_heads"], "num_key_value_heads": config["n_kv_heads"],
           "head_dim": config["head_dim"], "intermediate_size": config["hidden_dim"],
           "rms_norm_eps": config["norm_eps"], "vocab_size": config["vocab_size"],
           "rope_theta": config["rope_theta"],
           "rope_scaling": _hf_rope_scaling(config.get("rope_scaling"), config.get("context_length") or 4096),
           "max_position_embeddings": config.get("context_length") or 4096,
           "tie_word_embeddings": bool(config.get("tie_word_embeddings")), **family(config).HF_CONSTANTS,
           "bos_token_id": config.get("bos_token_id"), "eos_token_id": ends[0] if len(ends) == 1 else ends,
           "torch_dtype": dtype, **hook(family(config), "to_hf")(config)}
    if kind == "mistral":
        out["sliding_window"] = config["sliding_window"]
    return out


def _hf_rope_scaling(scaling, context):
    if scaling is None:
        return None
    if scaling["rope_type"] == "longrope":
        # Phi-3's three keys, all transformers 4 takes; the scale only where the context does not imply it
        original = scaling["original_max_position_embeddings"]
        implied = math.isclose(longrope_attention(context / original, original), scaling["attention_factor"])
        return {"type": "longrope", "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"],
                **({} if implied else {"attention_factor": scaling["attention_factor"]})}
    return dict(scaling, type=scaling["rope_type"])  # older transformers read "type"


def write_tokenizer_files(checkpoint, folder):
    """The tokenizer's files as the model folder has them, the chat template in
    tokenizer_config.json (where transformers 4 looks) and chat_template.jinja (5)."""
    checkpoint.write_tokenizer(folder)
    template = chat_template(folder)
    tok_config_path = os.path.join(folder, "tokenizer_config.json")
    tok_config = _optional_json(tok_config_path)
    if "add_bos_token" in checkpoint.config:
        tok_config["add_bos_token"] = checkpoint.config["add_bos_token"]
    if template is not None:
        tok_config["chat_template"] = template
    if tok_config:
        _write_json(tok_config_path, tok_config)


def _write_json(path, obj):
    import json

    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
