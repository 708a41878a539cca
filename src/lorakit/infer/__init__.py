"""Generation: one base model, any number of named adapters, one step-wise decoder.

- `session`: a loaded base and its adapters, each with the template it was trained on;
- `decoder`: the step-wise decoder every stage generates through (rows with their own adapter,
  sampler, stop tokens and strings, and key/value slot), built on `kv` (per-row attention),
  `sampling` (per-row token choice) and `text` (streaming detokenization, stop strings);
- `generate`: answers to conversations through the trained template;
- `messages`: what a conversation must look like.
"""

from lorakit.infer.decoder import BASE, Decoder, Request, Row
from lorakit.infer.generate import Completion, answer_text, generate, generate_batch
from lorakit.infer.messages import ROLES, messages_from_instruction, read_messages_file, validate_messages
from lorakit.infer.sampling import Sampler, Sampling
from lorakit.infer.session import Adapter, Session, adapter_name, load_session

__all__ = ["Adapter", "BASE", "Completion", "Decoder", "ROLES", "Request", "Row", "Sampler", "Sampling", "Session",
           "adapter_name", "answer_text", "generate", "generate_batch", "load_session",
           "messages_from_instruction", "read_messages_file", "validate_messages"]
