"""The OpenVLA adapter (policies/openvla.py) on a tiny randomly initialised VLM (tests/tiny_vlm).

Checked: OpenVLA's action tokenisation and un-normalisation formulas; K samples from one
encoding, drawn only from the action tokens and decoding to in-range actions; the action-token
loss falling under LoRA; V-GPS steering and PA-RL's optimisation and distillation running on the
adapter unchanged; loading through transformers' auto classes (remote code only when opted in);
and bad input (a dataset key without statistics, an unknown instruction embedding).
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from test_parl import QuadraticCritic
import tiny_vlm
from policies.base import POLICIES, Policy, TrainablePolicy
from policies.common import PolicyBatch
from policies.openvla import (action_norm_stats, action_tokens, NUM_BINS, OpenVLAPolicy,
                              PROMPT, token_values)
from robot_rl.data import rlds
from robot_rl.data.oxe import StatsTable
from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.rl import parl
from robot_rl.steering import ValueGuidedSteering
from robot_rl.types import ActionSpace, IMAGE_KEY

INSTRUCTIONS = ['Put the carrot on the plate', 'open the drawer', 'pick up the cup',
                'close the drawer']
LANG = torch.nn.functional.normalize(torch.eye(4) + 0.1, dim=1)
"""Stand-in 4-d instruction embeddings (one per instruction), shared by policy and critic."""

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def make_policy(seed=0, **kwargs):
    model, processor = tiny_vlm.build(seed)
    kwargs = {'unnorm_key': tiny_vlm.DATASET_KEY, 'norm_stats': tiny_vlm.NORM_STATS, **kwargs}
    policy = OpenVLAPolicy(model=model, processor=processor, **kwargs)
    policy.remember_instructions(INSTRUCTIONS, LANG)
    return policy


def observation(seed=0):
    return {IMAGE_KEY: tiny_vlm.images(1, seed=seed)[0]}


def openvla_reference(stats, vocab_size):
    """OpenVLA's ActionTokenizer and predict_action un-normalisation, in numpy, as published."""
    bins = np.linspace(-1, 1, NUM_BINS)
    centers = (bins[:-1] + bins[1:]) / 2.0
    q01, q99 = np.asarray(stats['q01']), np.asarray(stats['q99'])
    mask = np.asarray(stats['mask'])

    def encode(action):
        return vocab_size - np.digitize(np.clip(action, -1.0, 1.0), bins)

    def decode(tokens):
        normalized = centers[np.clip(vocab_size - tokens - 1, 0, centers.shape[0] - 1)]
        return np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)

    return encode, decode


def test_tokens_and_unnormalisation_match_openvla():
    vocab = 32000
    stats = tiny_vlm.NORM_STATS[tiny_vlm.DATASET_KEY]['action']
    encode, decode = openvla_reference(stats, vocab)
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1.2, 1.2, (500, 7)), np.linspace(-1, 1, 7)[None],
                             np.full((1, 7), 1.0), np.full((1, 7), -1.0)])
    tokens = action_tokens(torch.from_numpy(values), vocab)
    np.testing.assert_array_equal(tokens.numpy(), encode(values))
    assert tokens.min() >= vocab - NUM_BINS and tokens.max() <= vocab - 1
    decoded = token_values(tokens, vocab).numpy()
    inside = np.abs(values) <= 1
    assert np.abs(decoded - values)[inside].max() <= 2.0 / (NUM_BINS - 1) + 1e-6
    # Un-normalisation: OpenVLA's formula, then the gripper clipped into the project's [0, 1].
    norm = action_norm_stats(tiny_vlm.NORM_STATS, tiny_vlm.DATASET_KEY)
    expected = decode(tokens.numpy())
    expected[:, 6] = np.clip(expected[:, 6], 0, 1)
    np.testing.assert_allclose(norm.unnormalise(decoded), expected, atol=1e-6)


def test_policy_units_round_trip_and_match_the_action_space():
    policy = make_policy()
    centres = token_values(torch.arange(32000 - NUM_BINS, 32000), 32000)
    values = centres[torch.randint(0, NUM_BINS, (64, 7), generator=torch.Generator()
                                   .manual_seed(0))]
    units = policy.to_policy_units(values)
    env = policy.action_space.unnormalise(units.numpy())
    np.testing.assert_allclose(env, policy.stats.unnormalise(values.numpy()), atol=1e-6)
    back = policy.to_model_units(units)
    movable = torch.ones(7, dtype=torch.bool)
    movable[6] = False  # the gripper's negative values all mean closed (0)
    torch.testing.assert_close(back[:, movable], values[:, movable], atol=1e-5, rtol=0)


def test_k_samples_from_one_encoding_decode_to_valid_in_range_actions():
    policy = make_policy()
    assert isinstance(policy, Policy) and isinstance(policy, TrainablePolicy)
    assert POLICIES['openvla'] is OpenVLAPolicy and policy.action_horizon == 1
    calls = []
    policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get('pixel_values') is not None),
        with_kwargs=True)
    actions = policy.sample_actions(observation(), INSTRUCTIONS[0], 16)
    assert calls == [True] + [False] * 6  # the image once, then one cached step per token
    assert actions.shape == (16, 1, 7) and actions.dtype == np.float32
    stats = tiny_vlm.NORM_STATS[tiny_vlm.DATASET_KEY]['action']
    low = np.array(stats['q01'][:6] + [0.0])
    high = np.array(stats['q99'][:6] + [1.0])
    assert (actions >= low - 1e-6).all() and (actions <= high + 1e-6).all()
    # Every value is a decoded bin centre, and the K samples differ (temperature 1).
    centres = token_values(torch.arange(policy.vocab_size - NUM_BINS, policy.vocab_size),
                           policy.vocab_size).numpy()
    allowed = policy.stats.unnormalise(np.repeat(centres[:, None], 7, axis=1))
    for dim in range(6):
        assert np.isin(np.round(actions[:, 0, dim], 6), np.round(allowed[:, dim], 6)).all()
    assert len(np.unique(actions[:, 0, 0])) > 1
    # Greedy decoding (temperature 0) gives K identical samples.
    greedy = make_policy(temperature=0.0).sample_actions(observation(), INSTRUCTIONS[0], 4)
    assert (greedy == greedy[:1]).all()


def test_sampling_draws_only_action_tokens_even_when_the_model_prefers_another():
    policy = make_policy()
    head = policy.model.get_output_embeddings()
    favourite = policy.space_token
    head.register_forward_hook(lambda module, args, out: out + 100.0 * nn.functional.one_hot(
        torch.tensor(favourite), out.shape[-1]).to(out.dtype))
    prefix = policy.encode_instructions(tiny_vlm.images(3), INSTRUCTIONS[:3])
    assert prefix.groups[0].logits.argmax(dim=-1).eq(favourite).all()
    tokens = policy.sample_tokens(prefix, 5)
    assert tokens.shape == (3, 5, 7)
    assert tokens.min() >= policy.vocab_size - NUM_BINS and tokens.max() < policy.vocab_size


def test_cached_decoding_agrees_with_one_full_forward_pass():
    """The K samples continue the encoded prefix exactly as the model reads the whole sequence
    (what supervised_loss trains): greedy tokens are the full pass's argmax at every step."""
    policy = make_policy(temperature=0.0)
    images, instructions = tiny_vlm.images(3), [INSTRUCTIONS[0], INSTRUCTIONS[1], INSTRUCTIONS[0]]
    tokens = policy.sample_tokens(policy.encode_instructions(images, instructions), 2)
    assert (tokens[:, 0] == tokens[:, 1]).all()
    first = policy.vocab_size - NUM_BINS
    for rows, inputs in policy.prompt_inputs(images, instructions):
        ids = torch.cat([inputs['input_ids'], tokens[rows, 0]], dim=1)
        with torch.no_grad():
            logits = policy.model(input_ids=ids, pixel_values=inputs['pixel_values']).logits
        greedy = logits[:, -8:-1, first:policy.vocab_size].argmax(dim=-1) + first
        torch.testing.assert_close(greedy, tokens[rows, 0])


def test_the_prompt_is_openvlas():
    policy = make_policy()
    text = policy.prompt('Put The Carrot on the plate')
    assert text == '<image>' + PROMPT.format(instruction='put the carrot on the plate')
    assert PROMPT.format(instruction='x') == 'In: What action should the robot take to x?\nOut:'
    (_, inputs), = policy.prompt_inputs(tiny_vlm.images(1), ['Put The Carrot on the plate'])
    assert inputs['input_ids'][0, -1] == policy.space_token  # '▁' before the action tokens
    assert inputs['input_ids'][0, 0] == policy.tokenizer.bos_token_id


def dataset_batch(policy, seed=0):
    """Four (image, instruction, action) examples; actions in the policy's units."""
    env = np.random.default_rng(seed).uniform(policy.action_space.low, policy.action_space.high,
                                              (4, 1, 7)).astype(np.float32)
    env[:, 0, 6] = [1.0, 0.0, 1.0, 0.0]
    actions = torch.from_numpy(policy.action_space.normalise(env))
    return PolicyBatch(torch.from_numpy(tiny_vlm.images(4, seed=seed)), LANG, actions,
                       torch.ones(4, 1)), env


def test_distillation_loss_falls_with_lora_and_only_the_adapters_train():
    policy = make_policy(temperature=0.0)
    policy.enable_lora(r=8)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainable = policy.trainable_parameters()
    assert trainable and all('lora_' in n for n, p in policy.named_parameters()
                             if p.requires_grad)
    batch, env = dataset_batch(policy)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(40):
        loss = policy.supervised_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    for name, param in policy.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    # The memorised actions come back in environment units (within a bin or two).
    bin_width = (policy.action_space.high - policy.action_space.low) * 2 / (NUM_BINS - 1)
    hits = []
    for i in range(4):
        sample = policy.sample_actions({IMAGE_KEY: batch.images[i].numpy()}, INSTRUCTIONS[i], 1)
        hits.append(np.abs(sample[0, 0, :6] - env[i, 0, :6]) <= 2 * bin_width[:6])
    assert np.mean(hits) > 0.8, np.mean(hits)


def test_masked_examples_do_not_count():
    policy = make_policy()
    batch, _ = dataset_batch(policy)
    first_only = batch._replace(mask=torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
    alone = PolicyBatch(batch.images[:1], batch.lang_emb[:1], batch.actions[:1],
                        torch.ones(1, 1))
    torch.testing.assert_close(policy.supervised_loss(first_only), policy.supervised_loss(alone))


def tiny_critic():
    torch.manual_seed(0)
    return Critic(CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=4, hidden_dims=(16,)))


def embed(texts):
    return LANG[[INSTRUCTIONS.index(t) for t in texts]]


def test_vgps_steering_runs_on_the_adapter():
    policy = make_policy()
    seen = []

    class Recorder:
        """The adapter, passed through; keeps the candidates it returned."""
        action_horizon = policy.action_horizon

        def reset(self, seed=None):
            policy.reset(seed)

        def sample_actions(self, obs, instruction, num_samples):
            seen.append(policy.sample_actions(obs, instruction, num_samples))
            return seen[-1]

    critic, space = tiny_critic(), ActionSpace.bridge()
    steering = ValueGuidedSteering(Recorder(), critic, space, num_samples=8, embed=embed)
    obs = observation()
    action = steering.act(obs, INSTRUCTIONS[1])
    assert action.shape == (7,) and np.isfinite(action).all()
    assert steering.last.candidates == 8
    q = steering.score(obs, INSTRUCTIONS[1], seen[0][:, 0])
    assert steering.last.chosen == int(np.argmax(q))
    np.testing.assert_allclose(action[:6], space.clip(seen[0][steering.last.chosen, 0])[:6])
    direct = ValueGuidedSteering(policy, critic, space, num_samples=8, embed=embed)
    assert direct.act(obs, INSTRUCTIONS[1]).shape == (7,)


TARGET = torch.tensor([0.3, -0.3, 0.2, 0.1, -0.2, 0.3, 0.8])
"""The known optimum of the quadratic critic, in the critic's (Bridge) normalised units."""


def test_parl_optimises_and_distils_the_adapter_unchanged():
    policy = make_policy()
    policy.enable_lora(r=8)
    space = ActionSpace.bridge()
    units = parl.UnitMap(policy.action_space, space, torch.device('cpu'))
    images = torch.from_numpy(tiny_vlm.images(4, seed=3))
    data = 2 * torch.rand(4, 7, generator=torch.Generator().manual_seed(1)) - 1
    cfg = parl.PARLConfig(num_samples=8, top_m=4, gradient_steps=10, step_size=0.1)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    # With a real (tiny) Cal-QL critic: the targets and one distillation step.
    batch = parl.distillation_batch(policy, tiny_critic(), images, LANG, data, units, cfg)
    assert batch.actions.shape == (4, 1, 7) and torch.isfinite(batch.actions).all()
    assert np.isfinite(parl.distil(policy, optimizer, batch))
    # With a critic of known optimum: the optimised actions beat the adapter's own samples ...
    critic = QuadraticCritic(TARGET)
    chunks = parl.sample_chunks(policy.eval(), images, LANG, 8)
    sampled = units.to_critic(chunks[:, :, 0])
    batch = parl.distillation_batch(policy, critic, images, LANG, data, units, cfg)
    optimised = units.to_critic(batch.actions[:, 0])
    nearest_sample = (sampled - TARGET).norm(dim=-1).min(dim=1).values
    assert ((optimised - TARGET).norm(dim=-1) < nearest_sample).all()
    # ... and distilling them makes the adapter's greedy actions land on them.
    losses = [parl.distil(policy, optimizer, batch) for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0], losses
    policy.temperature = 0.0
    greedy = parl.sample_chunks(policy.eval(), images, LANG, 1)[:, 0, 0]
    assert (greedy - batch.actions[:, 0]).abs().max() < 0.05


def test_a_dataset_key_without_statistics_is_an_error_naming_it():
    model, processor = tiny_vlm.build()
    with pytest.raises(ValueError, match="dataset key 'bridge_orig'.*other_robot"):
        OpenVLAPolicy(model=model, processor=processor, norm_stats=tiny_vlm.NORM_STATS,
                      unnorm_key='bridge_orig')
    with pytest.raises(ValueError, match='2 datasets.*unnorm_key'):
        OpenVLAPolicy(model=model, processor=processor, norm_stats=tiny_vlm.NORM_STATS)
    broken = {'tiny_bridge': {'action': {'q01': [0.0] * 7, 'mask': [True] * 7}}}
    with pytest.raises(ValueError, match=r"dataset key 'tiny_bridge'.*\['q99'\]"):
        OpenVLAPolicy(model=model, processor=processor, norm_stats=broken,
                      unnorm_key='tiny_bridge')
    short = {'six_dof': {'action': {'q01': [0.0] * 6, 'q99': [1.0] * 6}}}
    with pytest.raises(ValueError, match="'six_dof' have 6 entries"):
        OpenVLAPolicy(model=model, processor=processor, norm_stats=short)
    with pytest.raises(ValueError, match='carries no normalisation statistics'):
        OpenVLAPolicy(model=model, processor=processor)


def test_the_projects_statistics_tables_are_accepted(tmp_path):
    """A StatsTable (robot_rl.data.oxe), in memory or saved as JSON: p01/p99 act as q01/q99."""
    actions = np.random.default_rng(0).normal(0, 0.02, (200, 7))
    actions[:, 6] = np.random.default_rng(1).integers(0, 2, 200)
    stats = rlds.ActionStats.from_actions(actions)
    table = StatsTable({'my_robot': rlds.DatasetStats(stats, stats, 3)})
    table.save(tmp_path / 'stats.json')
    model, processor = tiny_vlm.build()
    for source in (table, tmp_path / 'stats.json'):
        policy = OpenVLAPolicy(model=model, processor=processor, norm_stats=source,
                               unnorm_key='my_robot')
        np.testing.assert_allclose(policy.action_space.low[:6], stats.p01[:6], rtol=1e-6)
        np.testing.assert_allclose(policy.action_space.high[:6], stats.p99[:6], rtol=1e-6)
        assert policy.stats.mask.tolist() == [True] * 6 + [False]
    with pytest.raises(ValueError, match="dataset key 'bridge_orig'.*my_robot"):
        OpenVLAPolicy(model=model, processor=processor, norm_stats=table,
                      unnorm_key='bridge_orig')


def test_unknown_instruction_embeddings_are_an_error():
    policy = make_policy()
    images = torch.from_numpy(tiny_vlm.images(1))
    with pytest.raises(ValueError, match='matches none of the 4 remembered instructions'):
        policy.encode(images, torch.ones(1, 4))
    assert policy.instructions.lookup(LANG[[2, 0]]) == [INSTRUCTIONS[2], INSTRUCTIONS[0]]


def test_loads_a_saved_model_through_the_auto_class(tmp_path):
    """A saved model directory loads through AutoModelForImageTextToText, statistics from its
    config (where OpenVLA keeps them), and samples as the in-memory model does."""
    model, processor = tiny_vlm.build()
    model.config.norm_stats = tiny_vlm.NORM_STATS
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = OpenVLAPolicy(str(tmp_path), tiny_vlm.DATASET_KEY, dtype='float32',
                           temperature=0.0)
    memory = OpenVLAPolicy(model=model, processor=processor, unnorm_key=tiny_vlm.DATASET_KEY,
                           temperature=0.0)
    obs = observation(seed=5)
    np.testing.assert_array_equal(loaded.sample_actions(obs, 'open the drawer', 2),
                                  memory.sample_actions(obs, 'open the drawer', 2))


REMOTE_CODE = """
from transformers import LlavaConfig, LlavaForConditionalGeneration


class TinyRemoteConfig(LlavaConfig):
    model_type = 'tiny_remote_vla'


class TinyRemoteVLA(LlavaForConditionalGeneration):
    config_class = TinyRemoteConfig
"""


def test_remote_code_loads_only_when_opted_in(tmp_path):
    """A model with its own code registered, as OpenVLA's is, under AutoModelForVision2Seq."""
    model, processor = tiny_vlm.build()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / 'modeling_tiny_remote.py').write_text(REMOTE_CODE)
    config = json.loads((tmp_path / 'config.json').read_text())
    config.update(model_type='tiny_remote_vla', norm_stats=tiny_vlm.NORM_STATS, auto_map={
        'AutoConfig': 'modeling_tiny_remote.TinyRemoteConfig',
        'AutoModelForVision2Seq': 'modeling_tiny_remote.TinyRemoteVLA'})
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='trust_remote_code'):
        OpenVLAPolicy(str(tmp_path), tiny_vlm.DATASET_KEY, dtype='float32')
    policy = OpenVLAPolicy(str(tmp_path), tiny_vlm.DATASET_KEY, dtype='float32',
                           trust_remote_code=True)
    assert type(policy.model).__name__ == 'TinyRemoteVLA'
    assert policy.sample_actions(observation(), 'open the drawer', 3).shape == (3, 1, 7)
