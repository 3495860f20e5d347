"""SAR3D-LLM, the 3D captioner (spec §6): a causal language model reads an object's token ids
and answers in words.

    ids (B, L) in generator order --the first N (all 3 planes of the first num_scales scales)-->
      ℓ2-normalised codebook rows (B, N, Cvae) --projector: Linear-GELU-Linear-GELU-Linear-->
      (B, N, D), put in place of the N <point_patch> placeholders of the user turn
      "<point_start><point_patch>×N<point_end>\\n{question}" --LLM--> the answer

The paper: Vicuna-7B (PointLLM-7B), N = 765 (8 of the paper VQVAE's 10 scales), projector
8 → 1024 → 2048 → 4096, question "Give a concise interpretation of the 3D data presented here.",
answer caption_3dtopia.txt. The turn is laid out by the tokenizer's own chat template, or, when it
has none (Vicuna), by the vicuna_v1_1 one: "SYSTEM USER: ... ASSISTANT: answer</s>".

The three point tokens are added to the tokenizer and the LLM's embeddings resized for them (new
rows: the mean of the old ones). The input rows of <point_start> and <point_end> live in a small
table of their own, `point_embed`, which shadows the LLM's rows: stage 1 (`freeze_llm(1)`) trains
the projector and that table and leaves every LLM weight bit-identical, with no gradient mask on
the large embedding matrix and no optimizer state for it. The <point_patch> row is never read.

Loss: cross-entropy on the answer tokens (the end token included), averaged per caption, then
over captions, so that a batch's loss does not depend on how it is split across processes and
micro-batches (the official token mean over one device's batch weighs long captions more).

Checkpoint (our format, kind "captioner"): what training changed, i.e. the projector, the point
rows and the codebook after stage 1, and also every LLM weight after stage 2. The base LLM folder
(`llm`) is read in both cases: it supplies the tokenizer and the architecture, and in stage 1 the
weights as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.layout import seq_len
from utils.checkpoint import CheckpointError, load_model, read_header
from utils.config import ConfigError, from_dict

PROMPT = "Give a concise interpretation of the 3D data presented here."
POINT_TOKENS = ("<point_start>", "<point_end>", "<point_patch>")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class CaptionerConfig:
    """Defaults: the paper's captioner over the paper VQVAE. vocab_size, c_vae and patch_nums
    name the VQVAE whose codebook the captioner reads (models.layout.check_pair checks them);
    `tokenizer` is that VQVAE's fingerprint, set by the trainer."""
    llm: str = "lmsys/vicuna-7b-v1.1"     # save_pretrained folder, or a hub id in the local cache
    vocab_size: int = 16384
    c_vae: int = 8
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    tokenizer: str = ""                   # (the VQVAE's fingerprint, as ARConfig.tokenizer)
    num_scales: int = field(default=8, metadata={"min": 1})   # scales read, coarse first (all if fewer)
    hidden: tuple[int, ...] = (1024, 2048)                    # projector hidden widths
    prompt: str = PROMPT
    max_new_tokens: int = field(default=128, metadata={"min": 1})
    point_tokens: tuple[str, str, str] = POINT_TOKENS         # start, end, patch placeholder
    dtype: Literal["float32", "bfloat16"] = "float32"         # of the LLM's weights as loaded

    @property
    def num_point_tokens(self) -> int:
        """N: the ids read per object, 3·Σpn² over the kept scales (765 for the paper)."""
        return seq_len(self.patch_nums[:self.num_scales])


def load_llm(source: str, dtype: torch.dtype):
    """(tokenizer, causal LM) from a save_pretrained folder, or a hub id already in the local
    cache; nothing is downloaded. Every failure is one FileNotFoundError/ValueError saying where
    the model goes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(source).expanduser()
    hub = not path.exists() and _HUB_ID.fullmatch(source) is not None
    fix = ("put a save_pretrained() copy of the language model (config, weights, tokenizer files) in a folder, "
           "e.g. `hf download lmsys/vicuna-7b-v1.1 --local-dir DIR` on a machine with internet, and point llm "
           "(--set llm=DIR; caption.py --llm DIR) at it")
    if not path.is_dir() and not hub:
        raise FileNotFoundError(f"no language model folder at {path}; {fix}")
    src = source if hub else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        where = f"'{source}' is not a folder nor in the local hub cache" if hub else f"cannot load it from {path}"
        first = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise FileNotFoundError(f"language model: {where} ({first.strip()}); {fix}") from None
    if info.get("missing_keys"):
        raise ValueError(f"language model {source}: {len(info['missing_keys'])} weights missing from its files "
                         f"(e.g. '{sorted(info['missing_keys'])[0]}'); {fix}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"language model {source}: its tokenizer has no end-of-sequence token")
    return tokenizer, model


class Captioner(nn.Module):
    """Projector + causal LM (see the module docstring). `codebook` (V, Cvae) holds the VQVAE's
    raw codebook rows (`set_codebook`); it is saved with the weights."""

    def __init__(self, cfg: CaptionerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CaptionerConfig()
        self.tokenizer, self.llm = load_llm(cfg.llm, getattr(torch, cfg.dtype))
        tok = self.tokenizer
        tok.add_tokens(list(cfg.point_tokens), special_tokens=True)
        self.point_ids = tok.convert_tokens_to_ids(list(cfg.point_tokens))     # start, end, patch
        table = self.llm.get_input_embeddings()
        old = table.num_embeddings
        if len(tok) > old:
            self.llm.resize_token_embeddings(len(tok), mean_resizing=False)
            with torch.no_grad():           # deterministic new rows, so stage 1 needs no copy of them
                for m in (self.llm.get_input_embeddings(), self.llm.get_output_embeddings()):
                    m.weight[old:] = m.weight[:old].float().mean(0).to(m.weight.dtype)
        table = self.llm.get_input_embeddings()
        self.point_embed = nn.Embedding(2, table.embedding_dim)
        with torch.no_grad():
            self.point_embed.weight.copy_(table.weight[self.point_ids[:2]].float())
        widths = (cfg.c_vae, *cfg.hidden, table.embedding_dim)
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.projector = nn.Sequential(*layers[:-1])
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, cfg.c_vae))
        gen_eos = getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None)
        self.stop_ids = sorted({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
        self._heads: dict = {}

    @property
    def num_point_tokens(self) -> int:
        return self.cfg.num_point_tokens

    def set_codebook(self, weight_VC: torch.Tensor) -> None:
        """Copy the VQVAE's codebook (quantizer.embedding.weight, (V, Cvae))."""
        if tuple(weight_VC.shape) != tuple(self.codebook.shape):
            raise ValueError(f"codebook of shape {tuple(weight_VC.shape)}, the captioner reads "
                             f"{tuple(self.codebook.shape)}")
        with torch.no_grad():
            self.codebook.copy_(weight_VC)

    def freeze_llm(self, stage: int) -> None:
        """Stage 1: only the projector and the point rows train; stage 2: everything."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (projector) or 2 (everything), got {stage}")
        self.llm.requires_grad_(stage == 2)
        self.projector.requires_grad_(True)
        self.point_embed.requires_grad_(True)

    def decoder_layers(self):
        """The LLM's transformer blocks (the FSDP units)."""
        return self.llm.get_decoder().layers

    # ---- prompt and answer ids -----------------------------------------------------------------
    def _user(self, question: str | None) -> str:
        start, end, patch = self.cfg.point_tokens
        return f"{start}{patch}{end}\n{question or self.cfg.prompt}"

    def _head(self, question: str | None) -> tuple[str, bool, list[int]]:
        """(text of the conversation up to the answer, whether the chat template wrote it (with
        its own BOS), its token ids with one placeholder)."""
        if question not in self._heads:
            user, patch = self._user(question), self.cfg.point_tokens[2]
            templated = bool(getattr(self.tokenizer, "chat_template", None))
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True) if templated \
                else f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"
            ids = self.tokenizer(text, add_special_tokens=not templated).input_ids
            if ids.count(self.point_ids[2]) != 1:
                raise ValueError(f"the prompt tokenizes to {ids.count(self.point_ids[2])} {patch} tokens, expected 1")
            self._heads[question] = text, templated, ids
        return self._heads[question]

    def prompt_ids(self, question: str | None = None) -> list[int]:
        """Token ids of the conversation up to the answer, the placeholder repeated N times."""
        ids = self._head(question)[2]
        i = ids.index(self.point_ids[2])
        return ids[:i] + [self.point_ids[2]] * self.num_point_tokens + ids[i + 1:]

    def answer_ids(self, caption: str, question: str | None = None) -> list[int]:
        """Token ids of the answer that follows prompt_ids, ending with a stop token."""
        text, templated, head = self._head(question)
        if templated:
            full = self.tokenizer.apply_chat_template([{"role": "user", "content": self._user(question)},
                                                       {"role": "assistant", "content": caption}], tokenize=False)
            if not full.startswith(text):
                raise ValueError("the tokenizer's chat template does not continue the prompt with the answer")
            answer = full[len(text):]
        else:
            answer = " " + caption                      # vicuna_v1_1: "ASSISTANT: answer</s>"
        # Tokenized after the prompt, where the model reads it.
        both = self.tokenizer(text + answer, add_special_tokens=not templated).input_ids
        ids = both[len(head):] if both[:len(head)] == head else \
            self.tokenizer(answer, add_special_tokens=False).input_ids
        return ids if ids and ids[-1] in self.stop_ids else ids + [self.tokenizer.eos_token_id]

    def training_inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids (B, P + A), answer mask (B, A)): the prompt (P ids) then each answer,
        right-padded to the longest (A ids); the mask marks the answers' own ids."""
        prompt = self.prompt_ids()
        answers = [self.answer_ids(c) for c in captions]
        A = max(len(a) for a in answers)
        ids = torch.tensor([prompt + a + [self.stop_ids[0]] * (A - len(a)) for a in answers])
        mask = torch.tensor([[i < len(a) for i in range(A)] for a in answers])
        return ids, mask

    # ---- forward ------------------------------------------------------------------------------
    def embed(self, ids_BL: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """The LLM's input (B, T, D): text embeddings, the point rows at <point_start>/<point_end>,
        and the projected ℓ2-normalised codebook rows of ids_BL[:, :N] at the N placeholders."""
        N = self.num_point_tokens
        if ids_BL.shape[1] < N:
            raise ValueError(f"{ids_BL.shape[1]} token ids per object; the captioner reads the first {N}")
        code_BNC = F.normalize(self.codebook, dim=-1)[ids_BL[:, :N]]
        point_BND = self.projector(code_BNC.to(self.projector[0].weight.dtype))
        x = self.llm.get_input_embeddings()(input_ids_BT)
        for k in range(2):
            row = self.point_embed.weight[k].to(x.dtype)
            x = torch.where((input_ids_BT == self.point_ids[k])[..., None], row, x)
        patch = input_ids_BT == self.point_ids[2]
        if (patch.sum(1) != N).any():
            raise ValueError(f"every row of input ids must hold {N} {self.cfg.point_tokens[2]} placeholders")
        return x.masked_scatter(patch[..., None], point_BND.to(x.dtype))

    def forward(self, ids_BL: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Teacher-forced loss of `captions` given the objects' ids (B, L): cross-entropy on the
        answer tokens, mean per caption, then over captions (a scalar)."""
        input_ids, mask = self.training_inputs(captions)
        input_ids, mask = input_ids.to(ids_BL.device), mask.to(ids_BL.device)
        A = mask.shape[1]
        logits = self.llm(inputs_embeds=self.embed(ids_BL, input_ids), use_cache=False,
                          logits_to_keep=A + 1).logits[:, :-1].float()          # position t predicts t + 1
        ce = F.cross_entropy(logits.flatten(0, 1), input_ids[:, -A:].flatten(), reduction="none").view_as(mask)
        return ((ce * mask).sum(1) / mask.sum(1)).mean()

    @torch.no_grad()
    def generate(self, ids_BL: torch.Tensor, question: str | None = None, greedy: bool = True,
                 max_new_tokens: int | None = None, temperature: float = 1.0, top_p: float = 0.9,
                 seed: int = 0) -> list[str]:
        """One answer per object (ids (B, L)) to `question` (default: the captioning prompt):
        greedy, or sampled at `temperature` from the top-p nucleus (seeded). Runs in eval mode."""
        if not greedy and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        was_training = self.training
        self.eval()
        try:
            device = self.codebook.device
            B = ids_BL.shape[0]
            prompt = torch.tensor(self.prompt_ids(question), device=device).expand(B, -1)
            x = self.embed(ids_BL.to(device), prompt)
            gen = None if greedy else torch.Generator(device=device).manual_seed(seed)
            stop = torch.tensor(self.stop_ids, device=device)
            cache, out = None, []
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for _ in range(max_new_tokens or self.cfg.max_new_tokens):
                o = self.llm(inputs_embeds=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, logits = o.past_key_values, o.logits[:, -1].float()
                logits[:, self.point_ids] = -float("inf")      # never a point token
                nxt = logits.argmax(-1) if greedy else sample_top_p(logits / temperature, top_p, gen)
                out.append(nxt)
                done |= torch.isin(nxt, stop)
                if done.all():
                    break
                x = self.llm.get_input_embeddings()(nxt[:, None])
        finally:
            self.train(was_training)
        texts = []
        for row in torch.stack(out, 1).tolist():
            ends = [i for i, t in enumerate(row) if t in self.stop_ids]
            texts.append(self.tokenizer.decode(row[:ends[0]] if ends else row, skip_special_tokens=True).strip())
        return texts


def sample_top_p(logits_BV: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One id per row from the smallest set of most likely ids whose probability reaches top_p."""
    probs, order = logits_BV.softmax(-1).sort(-1, descending=True)
    probs[(probs.cumsum(-1) - probs) >= top_p] = 0            # the first id always stays
    pick = torch.multinomial(probs, 1, generator=gen)
    return order.gather(-1, pick)[:, 0]


# ----------------------------------------------------------------------------- checkpoints

def _tied(state: dict) -> set:
    """Keys whose tensor is an earlier key's (tied weights, e.g. lm_head = embed_tokens in some
    LLMs): saved once, and filled again by the tie when loaded."""
    seen, tied = set(), set()
    for k, v in state.items():
        where = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if where in seen and v.numel():
            tied.add(k)
        seen.add(where)
    return tied


def trained_state(state: dict, stage: int) -> dict:
    """What a stage changes (module docstring): stage 1 everything but the LLM, stage 2 all."""
    tied = _tied(state)
    return {k: v for k, v in state.items() if k not in tied and (stage == 2 or not k.startswith("llm."))}


def load_trained(model: Captioner, state: dict, where) -> None:
    """Load a checkpoint's tensors (trained_state of stage 1 or 2) into `model`, whose LLM holds
    the base weights: every non-LLM tensor must be there, and the LLM's either all or none."""
    own = model.state_dict()
    tied = _tied(own)
    problems = [f"the file has '{k}', which this captioner does not make" for k in state if k not in own]
    problems += [f"'{k}' has shape {tuple(state[k].shape)} in the file, the config makes {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    llm = [k for k in own if k.startswith("llm.") and k not in tied]
    held = sum(k in state for k in llm)
    problems += [f"'{k}' is missing from the file" for k in own if not k.startswith("llm.") and k not in state]
    if 0 < held < len(llm):
        problems.append(f"it holds {held} of the LLM's {len(llm)} tensors (all after stage 2, none after stage 1)")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{where}: weights do not match the captioner ({problems[0]}{more}); "
                              "is llm the base model it was trained from?")
    model.load_state_dict(state, strict=False)


def read_captioner_config(ckpt) -> CaptionerConfig:
    """The config stored with a captioner checkpoint (before anything large is loaded)."""
    _, cfg, _, _ = read_header(ckpt, "captioner")
    try:
        return from_dict(CaptionerConfig, cfg)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}: its config is not a captioner's ({e})") from None


def _beside(llm: str, ckpt) -> str:
    """A relative LLM folder as the config names it: from the working directory, else from the
    first folder above the checkpoint that holds it (a training run names it from where it ran)."""
    path = Path(llm)
    if path.is_absolute() or path.exists():
        return llm
    found = next((p / path for p in Path(ckpt).resolve().parents if (p / path).is_dir()), None)
    return str(found) if found is not None else llm


def load_captioner(ckpt, device="cpu", llm: str | None = None, dtype: str | None = None) -> Captioner:
    """A Captioner from our checkpoint folder, in eval mode; `llm` replaces the base LLM folder
    it names (moved elsewhere), `dtype` its weights' dtype (bfloat16 halves a 7B's memory). A
    relative folder is looked for from the working directory, then above the checkpoint."""
    cfg = read_captioner_config(ckpt)
    cfg.llm, cfg.dtype = llm or _beside(cfg.llm, ckpt), dtype or cfg.dtype
    model = Captioner(cfg)
    load_trained(model, load_model(ckpt, "captioner")[0], ckpt)
    return model.to(device).eval()
