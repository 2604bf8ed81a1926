"""Tiny offline stand-ins for popular model families: each family's verbatim chat template (tests/data/chat_templates/,
sources in its README.md) on a small byte-level BPE vocabulary that carries the family's real special tokens, with
its BOS/EOS/pad settings and the EOS list its generation_config.json ships. Weights are random; only the tokenizer
and template matter to what is trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"

# The conversations every family is tested on (short, so the tiny vocabulary holds their words).
SYSTEM = "Answer briefly."
Q1, A1 = "What colour is the sky?", "The sky is blue."
Q2, A2 = "What do bees make?", "Bees make honey."
Q3, A3 = "Where do fish live?", "Fish live in water."
REASONING = "Light scatters, blue the most."
WEATHER_Q, WEATHER_RESULT = "What is the weather in Paris?", "22 C and sunny"
WEATHER_A = "It is 22 C and sunny in Paris."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                "id": "call00001"}  # Mistral's templates want 9-character ids


@dataclass
class Family:
    name: str
    template: str  # file under TEMPLATES
    bos: str | None
    eos: str
    pad: str | None
    special: list[str]  # every special token (bos, eos, pad, unk and the template's control tokens)
    added: list[str] = field(default_factory=list)  # added tokens that are not special (Qwen's <think>, ...)
    unk: str | None = None
    add_bos: bool = False  # the tokenizer puts BOS before a plain text (its post-processor)
    generation_eos: list[str] = field(default_factory=list)  # generation_config.json's eos_token_id, in order
    end_of_turn: str = ""  # the token closing an assistant turn in its template
    tools: bool = False  # the template renders tool calls
    reasoning: bool = False  # the template understands reasoning (<think>)
    system: bool = True  # the template accepts a system message

    @property
    def chat_template(self) -> str:
        return (TEMPLATES / self.template).read_text(encoding="utf-8")


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|vision_pad|>"]
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

FAMILIES = {family.name: family for family in [
    Family("llama-3.1", "llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_SPECIAL, add_bos=True,
           generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], end_of_turn="<|eot_id|>", tools=True),
    Family("llama-3.2", "llama3_2.jinja", "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_SPECIAL, add_bos=True,
           generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], end_of_turn="<|eot_id|>", tools=True),
    Family("qwen2.5", "qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>", QWEN_SPECIAL,
           added=["<tool_call>", "</tool_call>"], generation_eos=["<|im_end|>", "<|endoftext|>"],
           end_of_turn="<|im_end|>", tools=True),
    Family("qwen3", "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", QWEN_SPECIAL,
           added=["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"],
           generation_eos=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>", tools=True, reasoning=True),
    Family("gemma-2", "gemma2.jinja", "<bos>", "<eos>", "<pad>", GEMMA_SPECIAL, unk="<unk>", add_bos=True,
           generation_eos=["<eos>", "<end_of_turn>"], end_of_turn="<end_of_turn>", system=False),
    Family("gemma-3", "gemma3.jinja", "<bos>", "<eos>", "<pad>", GEMMA_SPECIAL, unk="<unk>", add_bos=True,
           generation_eos=["<eos>", "<end_of_turn>"], end_of_turn="<end_of_turn>"),
    Family("mistral-v0.3", "mistral_v0_3.jinja", "<s>", "</s>", None, MISTRAL_SPECIAL, unk="<unk>", add_bos=True,
           generation_eos=["</s>"], end_of_turn="</s>", tools=True),
    Family("mistral-nemo", "mistral_nemo.jinja", "<s>", "</s>", None, MISTRAL_SPECIAL + ["<pad>"], unk="<unk>",
           add_bos=True, generation_eos=["</s>"], end_of_turn="</s>", tools=True),
    Family("phi-3.5", "phi3_5.jinja", "<s>", "<|endoftext|>", "<|endoftext|>",
           ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|end|>", "<|system|>",
            "<|user|>"], unk="<unk>", generation_eos=["<|end|>", "<|assistant|>", "<|endoftext|>"],
           end_of_turn="<|end|>"),
    Family("phi-4", "phi4.jinja", "<|endoftext|>", "<|im_end|>", "<|dummy_85|>",
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"],
           generation_eos=["<|im_end|>"], end_of_turn="<|im_end|>"),
    Family("smollm2", "smollm2.jinja", "<|im_start|>", "<|im_end|>", "<|im_end|>",
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"], unk="<|endoftext|>",
           generation_eos=["<|im_end|>"], end_of_turn="<|im_end|>"),
    Family("deepseek-r1-distill", "deepseek_r1_distill.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
           "<｜end▁of▁sentence｜>",
           ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>"], added=["<think>", "</think>"], add_bos=True,
           generation_eos=["<｜end▁of▁sentence｜>"], end_of_turn="<｜end▁of▁sentence｜>", reasoning=True),
]}


def corpus(family: Family) -> list[str]:
    """Text the vocabulary is trained on: the test conversations and the template's own literal text."""
    lines = [SYSTEM, Q1, A1, Q2, A2, Q3, A3, REASONING, WEATHER_Q, WEATHER_RESULT, WEATHER_A,
             f"{Q1}\n{A1}", "Cutting Knowledge Date: December 2023", "You are a helpful assistant.",
             '{"name": "get_weather", "arguments": {"city": "Paris"}}', "system user assistant model"]
    return lines * 3 + family.chat_template.splitlines()


def build_tokenizer(folder: Path, family: Family):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=family.special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(family), trainer=trainer)
    named = {family.bos, family.eos, family.pad, family.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token=family.unk, add_bos_token=family.add_bos,
        additional_special_tokens=[token for token in family.special if token not in named])
    if family.added:
        fast.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.added])
    fast.chat_template = family.chat_template
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, family: Family) -> Path:
    """A tiny random Llama carrying the family's tokenizer, chat template and generation config."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, family)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(token) for token in family.generation_eos])
    model.save_pretrained(folder)
    return folder
