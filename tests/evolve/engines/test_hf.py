"""The transformers engine: batched greedy decoding equals one-by-one decoding, weights swap in place."""

from __future__ import annotations

import pytest
import torch

from evolve.engines.hf import TransformersEngine

PROMPTS = ["Return x plus 3.\nAnswer:", "List the files in /etc.\nAnswer:", "Who works in hr?\nAnswer:"]


def test_batched_greedy_equals_unbatched(tiny_model, tiny_tokenizer):
    batched = TransformersEngine(tiny_model, tiny_tokenizer, batch_size=64).generate(PROMPTS, max_new_tokens=12)
    single = TransformersEngine(tiny_model, tiny_tokenizer, batch_size=1).generate(PROMPTS, max_new_tokens=12)
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_generation_matches_a_manual_greedy_loop(tiny_model, tiny_tokenizer):
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    ids = tiny_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            nxt = tiny_model(ids).logits[0, -1].argmax()
            if nxt.item() == tiny_tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    n_prompt = len(tiny_tokenizer(PROMPTS[0])["input_ids"])
    expected = tiny_tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
    assert engine.generate(PROMPTS[:1], max_new_tokens=8) == [expected]


def test_load_state_dict_overwrites_in_place(tiny_model, tiny_tokenizer, tiny_arch):
    from evolve.models.modeling import new_model

    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    before = {k: v.data_ptr() for k, v in engine.state_dict().items()}
    other = new_model(tiny_arch, tiny_tokenizer, seed=1)
    engine.load_state_dict(other.state_dict())
    after = engine.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == before
    for k, v in other.state_dict().items():
        assert torch.equal(after[k], v) if k in after else True
    want = TransformersEngine(other, tiny_tokenizer).generate(PROMPTS, max_new_tokens=6)
    assert engine.generate(PROMPTS, max_new_tokens=6) == want


def test_load_state_dict_refuses_wrong_weights(tiny_model, tiny_tokenizer):
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    sd = {k: v.clone() for k, v in engine.state_dict().items()}
    name = next(iter(sd))
    with pytest.raises(ValueError, match=name):
        engine.load_state_dict({**sd, name: torch.zeros(3)})
    del sd[name]
    with pytest.raises(KeyError, match="lack 1"):
        engine.load_state_dict(sd)


def test_generate_chat_batches_whole_conversations_and_cuts_at_stop(tiny_model, tiny_tokenizer):
    """Episodes send whole conversations; one user turn is exactly the chat-format prompt, batched equals alone,
    and ``stop`` cuts the text where vLLM would."""
    engine = TransformersEngine(tiny_model, tiny_tokenizer)
    prompts = [p.removesuffix("\nAnswer:") for p in PROMPTS]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    chat = engine.generate_chat(convs, max_new_tokens=10)
    assert chat == engine.generate(prompts, max_new_tokens=10, chat=True)
    longer = [*convs[0], {"role": "assistant", "content": chat[0]}, {"role": "user", "content": prompts[1]}]
    together = engine.generate_chat([longer, convs[2]], max_new_tokens=10)
    assert together == [engine.generate_chat([longer], max_new_tokens=10)[0], chat[2]]
    full = engine.generate_chat(convs[:1], max_new_tokens=10)[0]
    if len(full) > 2:
        stop = full[1:3]
        assert engine.generate_chat(convs[:1], max_new_tokens=10, stop=[stop])[0] == full[: full.find(stop)]
