"""A tiny randomly initialised OpenVLA-shaped vision-language model, built offline.

No weights can be downloaded in tests, so the OpenVLA adapter runs on a Llava model from
`transformers` with a 2-layer Llama text decoder and a 1-layer SigLIP vision tower (about 66k
parameters), a character-level tokenizer built with the `tokenizers` library and an image
processor constructed from arguments. Like Llama-2's, the tokenizer adds a BOS token, has the
word-boundary piece '▁', and its base vocabulary ends with 256 rarely used entries (here
'<act_i>') that OpenVLA takes over as action bins; '<pad>' and '<image>' are added tokens,
outside the base vocabulary, as OpenVLA's pad token is.
"""

import numpy as np
import torch

IMAGE_SIZE = 32
"""Side of the model's input image (the processor resizes observations to it)."""
PATCH = 8
BASE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:?.,'-\n"

DATASET_KEY = 'tiny_bridge'
NORM_STATS = {
    DATASET_KEY: {'action': {
        'q01': [-0.03, -0.04, -0.025, -0.1, -0.12, -0.2, 0.0],
        'q99': [0.03, 0.035, 0.03, 0.11, 0.1, 0.2, 1.0],
        'mask': [True] * 6 + [False]}},
    'other_robot': {'action': {
        'q01': [-1.0] * 7, 'q99': [1.0] * 7, 'mask': [True] * 7}},
}
"""OpenVLA-style statistics (the shape of OpenVLA's config.norm_stats) for two datasets."""


def build_tokenizer():
    """A Llama-like fast tokenizer: characters after a Metaspace pre-tokenizer, BOS prepended."""
    from tokenizers import decoders, models, pre_tokenizers, processors, Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, '\u2581': 3}
    for char in BASE_CHARS:
        vocab.setdefault(char, len(vocab))
    for i in range(256):
        vocab[f'<act_{i}>'] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581',
                                                       prepend_scheme='first', split=False)
    tokenizer.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='first',
                                           split=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token='<s>',
                                   eos_token='</s>', unk_token='<unk>')
    fast.add_special_tokens({'pad_token': '<pad>', 'additional_special_tokens': ['<image>']})
    return fast


def build_processor():
    """LlavaProcessor: the tokenizer above and a SigLIP image processor (resize + normalise)."""
    import transformers

    # The PIL backend: the default one needs torchvision, which is not installed here.
    image_class = getattr(transformers, 'SiglipImageProcessorPil',
                          transformers.SiglipImageProcessor)
    image_processor = image_class(size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor=image_processor,
                                       tokenizer=build_tokenizer(), patch_size=PATCH,
                                       vision_feature_select_strategy='full',
                                       image_token='<image>', num_additional_image_tokens=0)


def build_model(processor, seed=0):
    """A randomly initialised LlavaForConditionalGeneration sized for `processor`'s tokenizer."""
    import transformers

    tokenizer = processor.tokenizer
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2)
    vision = transformers.SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2)
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids('<image>'), vision_feature_layer=-1,
        vision_feature_select_strategy='full', projector_hidden_act='gelu')
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


def build(seed=0):
    """(model, processor) of a fresh tiny VLM."""
    processor = build_processor()
    return build_model(processor, seed), processor


def images(count, size=48, seed=0):
    """`count` random uint8 RGB frames (count, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
