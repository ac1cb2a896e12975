"""Optimizer steps one parameter at a time: the fused backward pass and bf16 weights with stochastic rounding.

:class:`ParamwiseOptimizer` holds one inner optimizer per parameter (the class and hyper-parameters the settings ask
for: torch's AdamW or bitsandbytes' 8-bit AdamW) behind the interface of one optimizer, so torch and diffusers
learning-rate schedules drive it (its ``param_groups`` are the real groups; each group's ``lr`` is copied into the
inner optimizers before they step) and its ``state_dict`` has the format of the ordinary optimizer: a state saved
without it resumes with it and the other way round.

- ``fused``: each parameter is updated as soon as its gradient is complete in the last backward pass of a step
  (``Tensor.register_post_accumulate_grad_hook``) and its gradient is freed at once, so the gradients of the whole
  model never exist together.  Gradient accumulation: earlier micro-batches accumulate as usual; only the backward
  pass after :meth:`ParamwiseOptimizer.arm` updates.  Clipping can then only see one gradient at a time:
  ``max_grad_norm`` bounds each parameter's gradient norm (not the global norm).
- ``bf16``: the trained weights are bf16.  Each update is computed in fp32 (the weight and its gradient upcast for
  the moment of the update, fp32 AdamW states; bitsandbytes' 8-bit states as it makes them) and written back with
  :func:`stochastic_round_bf16`, seeded by (seed, step, parameter index) so that a resumed run draws the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch  # this module is imported only when training builds its optimizer

from ..data.dataset import mix_seed


def stochastic_round_bf16(value: Any, generator: Any = None) -> Any:
    """``value`` (fp32) rounded to bf16 up or down at random, with the probability that makes the result unbiased.

    bf16 is fp32 without the low 16 bits of the mantissa.  Adding 16 uniform random bits below the kept mantissa and
    then dropping them rounds the magnitude up with probability (dropped part / one bf16 step): the expected value is
    ``value`` itself, where round-to-nearest would lose every update smaller than half a bf16 step.
    """
    bits = value.detach().contiguous().view(torch.int32)
    rounded = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded.add_(bits).bitwise_and_(-65536)  # -65536: 0xFFFF0000, the bits bf16 keeps (in place: one temporary)
    return rounded.view(torch.float32).to(torch.bfloat16)


class ParamwiseOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter behind one optimizer's interface (see the module's docstring).

    ``build(groups)``: the ordinary optimizer over ``groups`` (called once for the defaults, then per parameter).
    ``fused``: update in the backward pass (see :meth:`arm`).  ``max_grad_norm`` (> 0, with ``fused``): clip each
    parameter's gradient to this norm before its update.  ``round_seed`` (not None): the weights are bf16 and are
    written back with stochastic rounding seeded by (round_seed, step, parameter index).
    """

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        build: Callable[[list[dict[str, Any]]], Any],
        *,
        fused: bool,
        max_grad_norm: float = 0.0,
        round_seed: int | None = None,
    ):
        super().__init__(param_groups, build(param_groups).defaults)
        self.fused_backward = fused
        self.max_grad_norm = max_grad_norm if fused else 0.0
        self.round_seed = round_seed
        self.step_number = 0  # the training step being made (seeds the rounding); the trainer sets it
        self.armed = False
        self.params: list[Any] = []
        self.group_of: list[dict[str, Any]] = []
        self.targets: list[Any] = []  # what each inner optimizer updates: the parameter, or its fp32 stand-in
        self.inners: list[Any] = []
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                target = param
                if round_seed is not None:  # an fp32 stand-in, filled only for the moment of the update
                    target = torch.nn.Parameter(torch.empty(0, dtype=torch.float32, device=param.device))
                self.params.append(param)
                self.group_of.append(group)
                self.targets.append(target)
                self.inners.append(build([{**settings, "params": [target]}]))
        self._link_states()
        self.hooks = []
        if fused:
            for index, param in enumerate(self.params):
                self.hooks.append(param.register_post_accumulate_grad_hook(lambda _, i=index: self._gradient_ready(i)))

    def _link_states(self) -> None:
        """``self.state[param]`` is the inner optimizer's state dict of that parameter (the same object), so code
        that sizes an optimizer's states sees these."""
        self.state.clear()
        for param, target, inner in zip(self.params, self.targets, self.inners):
            self.state[param] = inner.state[target]

    def arm(self) -> None:
        """The next backward pass is the step's last: it updates each parameter as its gradient completes (until
        :meth:`step` disarms)."""
        self.armed = True

    def close(self) -> None:
        """Remove the gradient hooks from the parameters (the modules outlive the run, e.g. in the WebUI)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _gradient_ready(self, index: int) -> None:
        if self.armed:
            self._update(index)

    @torch.no_grad()
    def _update(self, index: int) -> None:
        """Update parameter ``index`` from its gradient and free the gradient."""
        param, target, inner = self.params[index], self.targets[index], self.inners[index]
        if param.grad is None:
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        inner.param_groups[0].update({k: v for k, v in self.group_of[index].items() if k != "params"})
        if self.round_seed is None:
            inner.step()
            param.grad = None
            return
        target.data = param.detach().float()
        target.grad = param.grad.float()
        param.grad = None
        inner.step()
        generator = torch.Generator(device=param.device)
        generator.manual_seed(mix_seed(self.round_seed, "round", self.step_number, index))
        param.copy_(stochastic_round_bf16(target.detach(), generator))
        target.data = torch.empty(0, dtype=torch.float32, device=param.device)
        target.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Update every parameter that still has a gradient (with ``fused``: none, the backward pass did) and
        disarm."""
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self._update(index)
        self.armed = False

    def state_dict(self) -> dict[str, Any]:
        """The ordinary optimizer's format: states by parameter position, groups with their hyper-parameters."""
        states: dict[int, Any] = {}
        for index, inner in enumerate(self.inners):
            saved = inner.state_dict()["state"]
            if saved.get(0):  # a parameter not updated yet has no state, as in the ordinary optimizer
                states[index] = saved[0]
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + count))})
            start += count
        return {"state": states, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of the ordinary optimizer's format (saved by it or by this class)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("loaded state dict does not match the optimizer's parameter groups")
        index = 0
        for group, saved in zip(self.param_groups, saved_groups):
            settings = {k: v for k, v in saved.items() if k != "params"}
            group.update(settings)
            for saved_id in saved["params"]:
                state = state_dict["state"].get(saved_id)
                self.inners[index].load_state_dict(
                    {"state": {} if state is None else {0: state}, "param_groups": [{**settings, "params": [0]}]}
                )
                index += 1
        self._link_states()
