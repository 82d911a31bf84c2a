"""Multi-turn fine-tuning data: a gold trajectory is trained on its assistant turns only."""

from __future__ import annotations

import copy

import pytest
import torch

from evolve.models.train import TrainSpec, encode_conversation, train

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "List the files in /etc."},
    {"role": "assistant", "content": "Act: bash ls /etc"},
    {"role": "user", "content": "The output of the OS: passwd hosts"},
    {"role": "assistant", "content": "Act: answer(2)"},
]


@pytest.fixture()
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def test_only_the_assistant_turns_are_trained_on(chat_tokenizer):
    ids, mask = encode_conversation(chat_tokenizer, CONVERSATION)
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    trained = chat_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    untrained = chat_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for turn in CONVERSATION:
        text = turn["content"].replace(" ", "")
        target = trained if turn["role"] == "assistant" else untrained
        assert text in target.replace(" ", ""), (turn, trained)
    assert "passwd" not in trained and "bash" not in untrained


def test_a_template_that_is_not_a_prefix_is_refused(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix"):
        encode_conversation(chat_tokenizer, CONVERSATION)


def test_the_loop_trains_on_masked_conversations(tiny_model, chat_tokenizer):
    example = encode_conversation(chat_tokenizer, CONVERSATION)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    spec = TrainSpec(steps=4, lr=1e-2, batch_size=2, warmup=0, mixture={"os": 1.0})
    losses = train(tiny_model, {"os": [example]}, spec, pad_id=chat_tokenizer.pad_token_id or 0, seed=0)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
