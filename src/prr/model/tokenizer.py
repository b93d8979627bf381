"""Tokenizers: GPT-2-style byte-level BPE rebuilt from GGUF metadata, or a Hugging Face tokenizer.json; chat
prompts through the model's own Jinja chat template."""

from __future__ import annotations

import jinja2.sandbox


class Tokenizer:
    def __init__(self, tok, eos_ids: list[int], bos_id: int | None = None, chat_template: str | None = None):
        self.tok = tok  # a tokenizers.Tokenizer
        self.eos_ids = eos_ids
        self.bos_id = bos_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt)
        return self.encode(text)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """From a GGUFReader's fields (``tokenizer.ggml.*``, ``tokenizer.chat_template``)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        model = fields["tokenizer.ggml.model"]
        if model != "gpt2":
            raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = HFTokenizer(bpe)
        pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if fields.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "llama-bpe", "qwen2"):
            pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
        tok.decoder = decoders.ByteLevel()
        # Control tokens (type 3) are matched whole and never split.
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True) if ty == 3])
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eos_ids = [eos] if eos is not None else []
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if name in tok.get_vocab() and tok.token_to_id(name) not in eos_ids:
                eos_ids.append(tok.token_to_id(name))
        return cls(tok, eos_ids, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str, config: dict) -> Tokenizer:
        import json
        import os

        from tokenizers import Tokenizer as HFTokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path} has no tokenizer.json (prr reads the fast tokenizer's file; "
                                    "tokenizer.save_pretrained(path) writes it)")
        tok = HFTokenizer.from_file(file)
        template, eos_ids = None, []
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                tcfg = json.load(f)
            template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
            eos_tok = tcfg.get("eos_token")
            eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
            if eos_tok and tok.token_to_id(eos_tok) is not None:
                eos_ids.append(tok.token_to_id(eos_tok))
        eos = config.get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None and e not in eos_ids:
                eos_ids.append(e)
        return cls(tok, eos_ids, config.get("bos_token_id"), template)
