"""A local model as a judge. Pairwise: its next-token probabilities of the labels A and B after a prompt that shows
the question and both answers (the template, a file the user may replace). Likelihood: its log-probability of each
answer's tokens after the question, and after an empty message. Nothing of its reply is parsed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.data.encoding import adds_bos
from alignment.errors import ConfigError
from alignment.logprobs import IGNORE_INDEX, sequence_logps

LABELS = ("A", "B")  # the first-shown answer is A
FIELDS = ("{question}", "{answer_a}", "{answer_b}")
MODES = ("likelihood", "pairwise")  # --judge-mode; the first is the default
Scored = tuple[list[int], int]  # a prompt and an answer's token ids, and how many of them are the prompt's


def default_template() -> Path:
    return Path(str(resources.files("alignment") / "assets" / "judge_template.txt"))


def read_template(path: str | Path | None) -> str:
    """The template's text without its leading '#' comment lines; it must hold {question}, {answer_a}, {answer_b}."""
    file = Path(path) if path is not None else default_template()
    if not file.is_file():
        raise ConfigError(f"--judge-template {file}: no such file")
    lines = file.read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    text = "\n".join(lines).strip()
    for field in FIELDS:
        if field not in text:
            raise ConfigError(f"--judge-template {file}: no {field} in it (it needs {', '.join(FIELDS)})")
    return text


@dataclass
class Judge:
    """A loaded judge: its model and tokenizer, the template, and (pairwise) the token ids of the two labels."""

    name: str  # what the user named (--judge), and what identifies its verdicts with the template
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: str
    mode: str = "pairwise"  # or "likelihood": each answer scored alone, the template unused

    def __post_init__(self) -> None:
        if self.mode == "pairwise":
            probe = self.render("q", "a", "b")
            self.label_ids = [self._label_id(probe, label) for label in LABELS]

    @property
    def identity(self) -> str:
        how = self.template if self.mode == "pairwise" else self.mode
        return hashlib.sha256(f"{self.name}\0{how}".encode()).hexdigest()[:16]

    def render(self, question: str, first: str, second: str) -> list[int]:
        """The judge's prompt as token ids, its own chat template's generation prompt at the end when it has one."""
        text = self.template
        for field, value in zip(FIELDS, (question, first, second), strict=True):
            text = text.replace(field, value)
        return self._message(text)

    def render_answer(self, question: str, answer: str) -> tuple[Scored, Scored]:
        """The answer after the question, and after an empty message, each as the judge's own reply."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        asked, empty = self._message(question), self._message("")
        return ([*asked, *ids], len(asked)), ([*empty, *ids], len(empty))

    def _message(self, text: str) -> list[int]:
        """A user message as token ids, the chat template's generation prompt after it when there is one."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text += "\n"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if adds_bos(self.tokenizer) and ids[:1] != [bos] else ids

    def _label_id(self, probe: list[int], label: str) -> int:
        text = self.tokenizer.decode(probe)
        ids = self.tokenizer(text + label, add_special_tokens=False)["input_ids"]
        plain = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != len(plain) + 1 or ids[: len(plain)] != plain:
            raise ConfigError(f"--judge {self.name}: its tokenizer does not read the label {label!r} as one token "
                              "after the prompt; end the template differently")  # fmt: skip
        return ids[-1]

    @torch.no_grad()
    def probabilities(self, prompts: Sequence[list[int]]) -> list[tuple[float, float]]:
        """(p(A), p(B)) of the next token after each prompt: one left-padded batch, the last position's logits."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)  # (b, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (b, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt's positions start at 0 after its padding
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        probs = logits[:, -1].float().softmax(-1)[:, self.label_ids]  # (b, 2)
        return [(a, b) for a, b in probs.tolist()]

    @torch.no_grad()
    def likelihoods(self, items: Sequence[tuple[Scored, Scored]]) -> list[tuple[float, float, int]]:
        """(log p(answer | question), log p(answer | empty message), answer tokens) of each item: one right-padded
        batch of both sequences of every item, the answer's tokens summed."""
        device = next(self.model.parameters()).device
        sequences = [s for item in items for s in item]
        width = max(len(ids) for ids, _ in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in sequences], device=device)  # (2b, T)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences], device=device)
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # (2b, T): the answers' tokens only
        for row, (_, start) in enumerate(sequences):
            labels[row, :start] = IGNORE_INDEX
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        logps = sequence_logps(logits[:, :-1].float(), labels[:, 1:]).tolist()  # (2b,)
        return [(logps[2 * i], logps[2 * i + 1], len(item[0][0]) - item[0][1]) for i, item in enumerate(items)]


def load_judge(
    name: str, template: str | Path | None, *, revision: str | None = None, in_4bit: bool = False, mode: str = MODES[0]
) -> Judge:
    """The judge named by --judge (a hub name, a directory, a .gguf file, `smollm2-135m-instruct`), full precision
    unless asked: a judge is read, not trained, and small ones are quicker unquantized on a CPU."""
    from alignment.hub.tokenizer import load_tokenizer
    from alignment.model.load import load_base

    text = read_template(template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base(name, revision=revision, load_in_4bit=in_4bit, compute_dtype=dtype, device=device).eval()
    return Judge(name, model, load_tokenizer(name, revision), text, mode)


def judge_all(
    judge: Judge,
    prompts: list[list[int]] | list[tuple[Scored, Scored]],
    *,
    batch_size: int,
    desc: str,
    on_batch: Callable[[list[int], list[tuple]], None],
) -> None:
    """Every prompt judged (pairwise: (p(A), p(B)); likelihood: `Judge.likelihoods`), in batches of similar length
    with a progress bar; each batch's indices and figures go to `on_batch` as soon as it is done."""
    pairwise = judge.mode == "pairwise"
    size = len if pairwise else (lambda item: len(item[0][0]))
    order = sorted(range(len(prompts)), key=lambda i: size(prompts[i]))
    with tqdm(total=len(prompts), desc=desc, unit="judgement") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            found = [prompts[i] for i in chunk]
            on_batch(chunk, judge.probabilities(found) if pairwise else judge.likelihoods(found))  # type: ignore[arg-type]
            progress.update(len(chunk))
