"""SDXL's text conditioning: two CLIP text encoders (transformers) and the six size/crop "time ids".

    context (B, 77, 2048) = concat(CLIP-L penultimate hidden state (768), OpenCLIP bigG penultimate (1280))
    pooled  (B, 1280)     = bigG's text projection of its EOS token. (Where a config says eos_token_id 2, as configs
                            written before transformers fixed that field do, transformers takes the highest token id
                            instead: with a learned token, whose id is higher, that token's position, in diffusers too.)
    time_ids (B, 6)       = (original_h, original_w, crop_top, crop_left, target_h, target_w)

Textual inversion adds a token (e.g. "<dog>") to both tokenizers, with a trainable row in both embedding tables.
"""
import itertools
import os
import re
import warnings
from dataclasses import dataclass

import torch

from checkpoint import (ModelError, check_keys, for_this_transformers, read_json, read_safetensors, read_weights,
                        weights_files, with_text_model_prefix)

TAG = re.compile(r"<[^<>\s]+>")  # a <word>, as learned tokens are written


@dataclass
class Cond:
    """Everything the UNet is conditioned on, for a batch."""
    context: torch.Tensor  # (B, 77, context_dim)
    pooled: torch.Tensor  # (B, pooled_dim)
    time_ids: torch.Tensor  # (B, 6)

    def to(self, device=None, dtype=None):
        """The time ids keep float32: bfloat16 would round an original size of 1023 to 1024."""
        return Cond(self.context.to(device, dtype), self.pooled.to(device, dtype), self.time_ids.to(device))

    def __getitem__(self, i):
        return Cond(self.context[i], self.pooled[i], self.time_ids[i])

    @staticmethod
    def cat(conds):
        return Cond(*(torch.cat(parts) for parts in zip(*((c.context, c.pooled, c.time_ids) for c in conds))))


def encoder_from_tensors(cls, config_dir, tensors, source):
    """A transformers CLIP text model from its config.json and a state dict (classic names), loaded strictly."""
    from transformers import CLIPTextConfig
    with torch.device("meta"):  # no random init of weights about to be replaced (14 s for bigG on a CPU)
        model = cls(CLIPTextConfig.from_pretrained(config_dir, local_files_only=True))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = for_this_transformers(tensors, expected)
    # transformers before 4.31 saved the token positions (a buffer, 0..76) in every file; it ignores them on load now
    tensors = {k: v for k, v in tensors.items() if k in expected or not k.endswith("embeddings.position_ids")}
    check_keys(expected, tensors, source)
    # assign: the tensors become the weights, in the memory layout they come in (the single file's projection is a
    # transposed view), and a layout changes a matmul's rounding
    model.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    # The token positions, a buffer not read from files: made here, as the model's own init makes it.
    for name, buffer in list(model.named_buffers()):
        if name.endswith("embeddings.position_ids"):
            model.get_submodule(name.rpartition(".")[0]).position_ids = torch.arange(buffer.shape[-1]).expand(1, -1)
    left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # another buffer that files do not hold, in some transformers version
        raise RuntimeError(f"{cls.__name__}: {left[0]} was left unset")
    return model.eval()


def time_ids(original_size, crop, target_size):
    """SDXL's micro-conditioning: original image size (h, w), crop top-left (top, left), target size (h, w)."""
    return torch.tensor([*original_size, *crop, *target_size], dtype=torch.float32)


class TextEncoders(torch.nn.Module):
    def __init__(self, folder, dtype=torch.float32, device="cpu", tensors=None):
        """The folder's tokenizers and encoders; with tensors ({"text_encoder": state dict, "text_encoder_2": ...},
        from the single-file checkpoint), the weights come from there and only the configs from the folder."""
        super().__init__()
        # Imported here rather than at the top: transformers takes seconds to import, and the scripts' --help, argument
        # errors and LoRA-only merges do not need it.
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()  # a bar per small file is noise
        parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
        for p in parts:
            if not os.path.isdir(os.path.join(folder, p)):
                raise ModelError(f"{os.path.join(folder, p)}: missing (expected the SDXL folder layout)")
        self.tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(folder, p), local_files_only=True)
                           for p in parts[:2]]
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        encoders = []
        for p, cls in classes.items():
            if tensors is None:  # the folder's weights, read and checked here as the UNet's are
                files = weights_files(os.path.join(folder, p), "model")
                weights, source = with_text_model_prefix(read_weights(files)), os.path.dirname(files[0])
            else:
                weights, source = tensors[p], f"the single file's {p}"
            encoders.append(encoder_from_tensors(cls, os.path.join(folder, p), weights, source).to(dtype))
        self.encoders = torch.nn.ModuleList(encoders).to(device)
        self.requires_grad_(False)
        index = os.path.join(folder, "model_index.json")  # the pipeline's: how it encodes an empty negative prompt
        self.zeros_for_empty = not os.path.isfile(index) or read_json(index).get("force_zeros_for_empty_prompt", True)

    @property
    def device(self):
        return self.encoders[0].device

    def tokenize(self, tokenizer, prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        for p in prompts:
            n = len(tokenizer(p, verbose=False).input_ids)  # verbose: transformers' own warning says the same
            if n > tokenizer.model_max_length:
                warnings.warn(f"prompt has {n} tokens; CLIP reads only the first {tokenizer.model_max_length}: {p!r}")
        return ids.to(self.device)

    def tokens(self, prompts):
        """prompts: list of str -> token ids for each encoder, [(B, 77), (B, 77)], on the encoders' device."""
        return [self.tokenize(tokenizer, prompts) for tokenizer in self.tokenizers]

    def encode(self, prompts, zero_empty=False):
        """prompts: list of str -> context (B, 77, 2048), pooled (B, 1280).
        With zero_empty (negative prompts), an empty prompt gives zeros, SDXL's unconditional input, unless the model's
        model_index.json says force_zeros_for_empty_prompt false (then "" is encoded, as diffusers' pipeline does)."""
        context, pooled = self.encode_tokens(self.tokens(prompts))
        if zero_empty and self.zeros_for_empty:
            keep = torch.tensor([p != "" for p in prompts], device=context.device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return context, pooled

    def encode_tokens(self, tokens):
        """Token ids [(B, 77), (B, 77)] -> context (B, 77, 2048), pooled (B, 1280)."""
        hidden = []
        for ids, encoder in zip(tokens, self.encoders):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, before the final LayerNorm
        return torch.cat(hidden, dim=-1), out.text_embeds  # pooled: the last encoder's (bigG's) projection

    # --- textual inversion: a new token with its own embedding row in both encoders ---

    def is_token(self, word):
        """Whether the vocabulary has word as one token (else CLIP reads it in pieces, letter by letter at worst)."""
        return len(self.tokenizers[0](word, add_special_tokens=False).input_ids) == 1

    def unknown_tokens(self, prompt):
        """The <word>s of a prompt that are not one token of the vocabulary: learned tokens never loaded."""
        return [w for w in TAG.findall(prompt) if not self.is_token(w)]

    def add_token(self, token, vectors):
        """Add token to both tokenizers with the given embedding rows (one per encoder); returns the new ids."""
        for tokenizer in self.tokenizers:  # a special token is split out first: the rest would not be the token
            inside = [s for s in tokenizer.all_special_tokens if s in token]
            if inside:  # "!", say: the second tokenizer's padding
                raise ModelError(f"the token {token!r} holds {inside[0]!r}, a special token of CLIP's tokenizer, "
                                 "which reads it apart; choose another")
        ids = []
        for tokenizer, encoder, vec in zip(self.tokenizers, self.encoders, vectors):
            if tokenizer.add_tokens([token]) != 1:
                raise ModelError(f"the token {token!r} is already in the vocabulary; choose another")
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            ids.append(tokenizer.convert_tokens_to_ids(token))
            with torch.no_grad():
                encoder.get_input_embeddings().weight[ids[-1]] = vec.to(encoder.get_input_embeddings().weight)
        return ids

    def word_vectors(self, word):
        """The embedding row of a single-token word in each encoder."""
        rows = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ModelError(f"the initializer word {word!r} must be one token of the model's vocabulary; it is "
                                 f"{len(ids)} tokens (choose a common word)")
            rows.append(encoder.get_input_embeddings().weight[ids[0]].detach().clone())
        return rows

    def train_token(self, token, init_word):
        """Add token, initialized from init_word, with trainable fp32 rows; returns them (one per encoder).
        Only these rows train: the rest of each table is untouched, bit for bit."""
        rows = [torch.nn.Parameter(v.float()) for v in self.word_vectors(init_word)]
        ids = self.add_token(token, rows)
        for encoder, i, row in zip(self.encoders, ids, rows):
            encoder.set_input_embeddings(TrainableRow(encoder.get_input_embeddings(), i, row))
        return rows

    def load_embeds(self, path, token):
        """Read learned_embeds.safetensors (keys clip_l, clip_g, each (1, dim)) and add its vectors as token."""
        tensors = read_safetensors(path)
        if set(tensors) != {"clip_l", "clip_g"}:
            found = sorted(tensors)
            raise ModelError(f"{path}: expected keys clip_l and clip_g, found {', '.join(found[:3])}"
                             + (f" and {len(found) - 3} more: is it a learned_embeds file?" if len(found) > 3 else ""))
        vectors = []
        for encoder, key in zip(self.encoders, ("clip_l", "clip_g")):
            dim = encoder.get_input_embeddings().weight.shape[1]
            if tensors[key].shape != (1, dim):
                raise ModelError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, this model needs (1, {dim})")
            vectors.append(tensors[key][0])
        self.add_token(token, vectors)


class TrainableRow(torch.nn.Module):
    """An embedding table whose row `index` is replaced by a separate (fp32, trainable) vector."""

    def __init__(self, table, index, row):
        super().__init__()
        self.table, self.index, self.row = table, index, row
        self.weight = table.weight  # get_input_embeddings().weight still reads the table, as transformers does

    def forward(self, input_ids):
        out = self.table(input_ids)
        return torch.where((input_ids == self.index)[..., None], self.row.to(out.dtype), out)
