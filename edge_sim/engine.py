"""The device's small model: prompt building within a token budget, incremental steps, batched generation."""

from __future__ import annotations

import torch

from cogenesis.core import prompts
from cogenesis.core.data import Record
from cogenesis.core.sampling import sample


class EdgeEngine:
    """Small model shared by the clients of one edge pool; every client keeps its own state."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int = 1536) -> None:
        """``model`` None: a simulated device (``cogenesis.edge_sim.device.ProfileDevice``), tokenizer only."""
        self.model = model.eval() if model is not None else None
        self.tok = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab = model.config.vocab_size if model is not None else len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_ids = frozenset(t for t in stops if isinstance(t, int) and t >= 0)

    def prompt_ids(self, record: Record, sketch: str | None = None) -> list[int]:
        """The with-context prompt; oldest history entries are dropped until it fits the budget."""
        for keep in range(len(record.history), -1, -1):
            ids = prompts.render(self.tok, record.edge_prompt(sketch, max_history=keep))
            if len(ids) <= self.max_prompt_tokens:
                return ids
        return ids[-self.max_prompt_tokens :]

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int | None],
    ) -> list[list[int]]:
        """Batched sampling for several clients (left-padded); each row has its own generator."""
        assert self.model is not None, "generate() needs the small model (a simulated device has none)"
        width = max(map(len, prompt_ids))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])  # [B, T]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
        outputs: list[list[int]] = [[] for _ in prompt_ids]
        done = [False] * len(prompt_ids)
        cache = None
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids = ids
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                lp = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
                nxt = []
                for b in range(len(prompt_ids)):
                    tok = int(sample(lp[b : b + 1], temperature, top_p, gens[b])[0]) if not done[b] else pad
                    if not done[b]:
                        if tok in self.stop_ids:
                            done[b] = True
                        else:
                            outputs[b].append(tok)
                    nxt.append(tok)
                if all(done):
                    break
                step_ids = torch.tensor(nxt)[:, None]
                mask = torch.cat([mask, torch.ones(len(nxt), 1, dtype=mask.dtype)], dim=1)
                position = position[:, -1:] + 1
        return outputs
