#!/usr/bin/python3
"""Pretrains micro-arith: a small Llama that adds whole numbers, partly.

Rerun from the repository root with Debian's python3-torch (the python3 first on PATH
may be another interpreter without torch):

    /usr/bin/python3 scripts/train-micro.py

CI does not run this script: its outputs are committed. It is seeded; one run takes a
few minutes on one CPU core (torch is limited to 1 thread; a BLAS such as OpenBLAS
(Debian libopenblas0-pthread) matters far more than threads).

Writes models/micro-arith/
  config.json, generation_config.json   LlamaForCausalLM, transformers field names
  model.safetensors                     F32, transformers tensor names, tied embeddings
  tokenizer.json, tokenizer_config.json character-level BPE (no merges) with its own
                                        chat template: <s><u>question<a>answer</s>
  exam.json                             the held-out exam (seeded, never trained on)
  micro.json                            what the script did: seed, steps, time, the
                                        challenger prompt and the base model's greedy
                                        exam accuracy and answers

The model is an independent Llama written here in plain torch, following the math of
transformers' LlamaForCausalLM (RMSNorm, split-half RoPE with theta 10000 and no
scaling, grouped-query attention, SiLU-gated MLP, tied LM head), so the engine loads it
through its normal path.

Training data, generated: the Solver's turn (user "a + b", assistant "a+b") and the
Challenger's turn (user: the lab's arithmetic challenger prompt, assistant: one problem
"a + b"). Operands run from 0 to 99, one or two digits equally likely. The
loss covers the assistant's tokens and the closing </s>. Training stops at the first
evaluation whose greedy exact-match exam accuracy reaches TARGET (a partial skill, so
self-play has something to improve); the script fails if that evaluation is above 0.6.

Dimension letters: B batch, T positions, C hidden, H / HK query and key-value heads,
D head_dim, F MLP width, V vocabulary, L layers.
"""

import json
import math
import os
import random
import re
import struct
import sys
import time

import torch

# One thread: on a shared 2-core machine OpenMP threads waiting at barriers cost more than they give.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "models", "micro-arith")

SEED = 11
MAX_OPERAND = 99
EXAM_SIZE = 240
EXAM_SEED = 2026
TARGET = 0.35
EVAL_EVERY = 100
MAX_STEPS = 6000
BATCH = 64
LR = 5e-3
CHALLENGER_EVERY = 8  # every 8th step trains the Challenger turn (a batch of BATCH // 4)

# The lab's arithmetic challenger prompt for operators "+" and operands 0..999
# (src/selfplay/prompts.ts, arithmeticChallengerText); the test checks they agree.
CHALLENGER_PROMPT = "Write one addition problem with two whole numbers from 0 to 99."

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 100,
}

# ---------------------------------------------------------------------------
# tokenizer: one token per printable ASCII character, five specials

SPECIALS = ["<unk>", "<s>", "</s>", "<u>", "<a>"]
CHARS = [chr(c) for c in range(32, 127)]
VOCAB = {t: i for i, t in enumerate(SPECIALS + CHARS)}
assert len(VOCAB) == CONFIG["vocab_size"]
BOS, EOS, USER, ASSISTANT = VOCAB["<s>"], VOCAB["</s>"], VOCAB["<u>"], VOCAB["<a>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<a>{{ message['content'] }}</s>"
    "{% else %}<u>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def tokenizer_files():
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(SPECIALS)]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": VOCAB, "merges": []},
    }
    cfg = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tok, cfg


def encode(text):
    return [VOCAB.get(ch, VOCAB["<unk>"]) for ch in text]


def decode(ids):
    inv = SPECIALS + CHARS
    return "".join(inv[i] for i in ids if i >= len(SPECIALS))


def chat_prompt(user):
    """The template's rendering of one user turn plus the generation prompt, as ids."""
    return [BOS, USER] + encode(user) + [ASSISTANT]


# ---------------------------------------------------------------------------
# data

def operand(rng):
    """0..99 with one or two digits equally likely."""
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def problem_text(a, b):
    return f"{a} + {b}"


def make_exam():
    rng = random.Random(EXAM_SEED)
    seen, problems = set(), []
    while len(problems) < EXAM_SIZE:
        a, b = operand(rng), operand(rng)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        problems.append({"question": problem_text(a, b), "answer": a + b})
    return problems


def example(rng, exam_set, challenger):
    """(prompt ids, completion ids): a Solver turn, or a Challenger turn. Exam problems
    never appear in either."""
    while True:
        a, b = operand(rng), operand(rng)
        if (a, b) not in exam_set:
            break
    if challenger:
        return chat_prompt(CHALLENGER_PROMPT), encode(problem_text(a, b)) + [EOS]
    return chat_prompt(problem_text(a, b)), encode(str(a + b)) + [EOS]


def batch(rng, exam_set, challenger):
    """ids [B, T], targets [B, T] (-100 outside completions), right-padded. One role per
    batch, so the short Solver sequences are not padded to the Challenger prompt."""
    B = BATCH // 4 if challenger else BATCH
    rows = [example(rng, exam_set, challenger) for _ in range(B)]
    T = max(len(p) + len(c) for p, c in rows) - 1
    ids = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        seq = p + c
        ids[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        tgt[r, len(p) - 1:len(seq) - 1] = torch.tensor(c)
    return ids, tgt


# ---------------------------------------------------------------------------
# the model: transformers' LlamaForCausalLM maths, its tensor names

def layer_shapes(cfg):
    C, F = cfg["hidden_size"], cfg["intermediate_size"]
    D, H, HK = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return [("self_attn.q_proj", [H * D, C]), ("self_attn.k_proj", [HK * D, C]),
            ("self_attn.v_proj", [HK * D, C]), ("self_attn.o_proj", [C, H * D]),
            ("mlp.gate_proj", [F, C]), ("mlp.up_proj", [F, C]), ("mlp.down_proj", [C, F])]


def init_weights(cfg, gen):
    std = cfg["initializer_range"]
    C, V = cfg["hidden_size"], cfg["vocab_size"]
    w = {"model.embed_tokens.weight": torch.randn([V, C], generator=gen) * std,
         "model.norm.weight": torch.ones(C)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(C)
        w[p + "post_attention_layernorm.weight"] = torch.ones(C)
        for module, shape in layer_shapes(cfg):
            # Output projections scaled down by depth, as GPT-2 does, for a stable start.
            s = std / math.sqrt(2 * cfg["num_hidden_layers"]) if module.endswith(("o_proj", "down_proj")) else std
            w[p + module + ".weight"] = torch.randn(shape, generator=gen) * s
    return {k: v.requires_grad_(True) for k, v in w.items()}


def rope_cos_sin(cfg, T):
    D = cfg["head_dim"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos(), both.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(cfg, w, ids):
    """Logits [B, T, V] of ids [B, T] (causal; right padding never reaches real tokens)."""
    B, T = ids.shape
    eps, D = cfg["rms_norm_eps"], cfg["head_dim"]
    H, HK = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    cos, sin = rope_cos_sin(cfg, T)
    cos, sin = cos[None, None], sin[None, None]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    embed = w["model.embed_tokens.weight"]
    x = embed[ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, HK, D).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, HK, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // HK, dim=1)
        v = v.repeat_interleave(H // HK, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    return rmsnorm(x, w["model.norm.weight"], eps) @ embed.T


@torch.no_grad()
def greedy_answers(cfg, w, questions, max_new=6):
    """Greedy completions, batched by prompt length (no padding inside a batch)."""
    out = [None] * len(questions)
    by_len = {}
    for n, q in enumerate(questions):
        by_len.setdefault(len(chat_prompt(q)), []).append(n)
    for _, rows in sorted(by_len.items()):
        ids = torch.tensor([chat_prompt(questions[n]) for n in rows])
        done = [False] * len(rows)
        gen = [[] for _ in rows]
        for _ in range(max_new):
            nxt = forward(cfg, w, ids)[:, -1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    if t == EOS:
                        done[r] = True
                    else:
                        gen[r].append(t)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for r, n in enumerate(rows):
            out[n] = decode(gen[r])
    return out


def final_number(text):
    """The last number written in an answer, as the lab's parseFinalNumber reads it."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(found[-1].replace(",", "")) if found else None


def exam_accuracy(cfg, w, exam):
    answers = greedy_answers(cfg, w, [p["question"] for p in exam])
    right = [final_number(a) == p["answer"] for a, p in zip(answers, exam)]
    return sum(right) / len(exam), answers


# ---------------------------------------------------------------------------
# files

def write_safetensors(path, tensors):
    """F32, names sorted, data in the same order; header padded to 8 bytes."""
    header = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-(8 + len(text))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def write_json(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main():
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = random.Random(SEED)
    cfg = CONFIG
    exam = make_exam()
    exam_set = {tuple(int(x) for x in p["question"].split(" + ")) for p in exam}
    w = init_weights(cfg, gen)
    opt = torch.optim.AdamW(list(w.values()), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.time()
    acc, answers, step, curve = 0.0, [], 0, []
    while step < MAX_STEPS:
        ids, tgt = batch(rng, exam_set, step % CHALLENGER_EVERY == CHALLENGER_EVERY - 1)
        logits = forward(cfg, w, ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 100)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step}: loss {loss.item():.3f}, {time.time() - t0:.0f} s", flush=True)
        if step % EVAL_EVERY == 0:
            acc, answers = exam_accuracy(cfg, w, exam)
            curve.append([step, round(loss.item(), 4), acc])
            print(f"step {step}: loss {loss.item():.3f}, exam {acc:.3f}, {time.time() - t0:.0f} s", flush=True)
            if acc >= TARGET:
                break
    seconds = time.time() - t0
    if not 0.2 <= acc <= 0.6:
        sys.exit(f"exam accuracy {acc:.3f} is outside 0.2..0.6 after {step} steps; change TARGET or EVAL_EVERY")
    os.makedirs(OUT, exist_ok=True)
    write_safetensors(os.path.join(OUT, "model.safetensors"), w)
    write_json("config.json", cfg)
    write_json("generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0,
                                          "do_sample": True, "temperature": 1.0})
    tok, tok_cfg = tokenizer_files()
    write_json("tokenizer.json", tok)
    write_json("tokenizer_config.json", tok_cfg)
    write_json("exam.json", {"format": "selfplay-lab.exam", "version": 1, "seed": EXAM_SEED,
                             "operators": ["+"], "maxOperand": MAX_OPERAND, "problems": exam})
    # Challenger check: what the greedy Challenger writes.
    challenger = greedy_answers(cfg, w, [CHALLENGER_PROMPT], max_new=12)[0]
    write_json("micro.json", {
        "seed": SEED, "steps": step, "batch": BATCH, "lr": LR, "seconds": round(seconds, 1),
        "torch": torch.__version__, "challengerPrompt": CHALLENGER_PROMPT,
        "greedyChallenger": challenger, "baseExamAccuracy": acc,
        "baseExamAnswers": answers, "curve": curve,
    })
    print(f"wrote {OUT}: {step} steps, {seconds:.0f} s, base exam accuracy {acc:.3f}, greedy challenger {challenger!r}")


if __name__ == "__main__":
    main()
