"""A tokenizer built locally from the skill world's training text, saved with every model.

Byte-level BPE with single-digit numbers, because its decoding is lossless: paths, quotes and SQL come back
exactly as generated. BOS is added by the post-processor, so ``transformers`` and vLLM tokenize a prompt the
same way, and the chat template renders the prompt format the models were trained on (the router talks chat).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from evolve.evaluators.base import ANSWER_CUE

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
#: Chat prompts render exactly as training prompts: the last user message, then the answer cue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{{ (messages | selectattr('role', 'equalto', 'user') | list | last)['content'] }}"
    "{{ '" + ANSWER_CUE.replace("\n", "\\n") + "' }}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits are split one by one: copying a number from the prompt then works for numbers never seen in that
    # template (with merged number tokens each value must be learned per template, and multi-token values
    # come out truncated).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
