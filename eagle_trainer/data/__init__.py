"""Data: chat JSONL, chat-template rendering with assistant loss masks, cached tokenised datasets,
batches, the draft vocab map (d2t / t2d), regeneration of responses by the target, and offline dumps of
the target's hidden states."""

from eagle_trainer.data.chat import read_chat_jsonl, write_chat_jsonl
from eagle_trainer.data.dataset import batch_indices, batches, build_dataset, collate, num_batches
from eagle_trainer.data.dump import dump_hidden_states
from eagle_trainer.data.offline import OfflineStore, dump_manifest, expected_manifest
from eagle_trainer.data.regenerate import regenerate
from eagle_trainer.data.template import tokenize_conversation
from eagle_trainer.data.vocab import build_vocab_map, draft_ids_from_d2t, load_vocab_map, save_vocab_map

__all__ = [
    "batch_indices",
    "batches",
    "build_dataset",
    "build_vocab_map",
    "collate",
    "draft_ids_from_d2t",
    "dump_hidden_states",
    "dump_manifest",
    "expected_manifest",
    "load_vocab_map",
    "num_batches",
    "OfflineStore",
    "read_chat_jsonl",
    "regenerate",
    "save_vocab_map",
    "tokenize_conversation",
    "write_chat_jsonl",
]
