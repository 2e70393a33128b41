"""The text of a ``raypo plan`` (:mod:`raypo.launch.plan`): the inputs, every term with its arithmetic, the
verdict, and the totals of the other offload x checkpointing settings."""

from __future__ import annotations

import dataclasses

from raypo.launch.plan import (
    GIB,
    HOST_USABLE_FRACTION,
    USABLE_FRACTION,
    Plan,
    compact,
    gpu_total_bytes,
    head_terms,
    model_state_terms,
    naive_head_bytes,
    reference_terms,
    zero3_model_states_bytes,
)


def _row(name: str, formula: str, gib: float) -> str:
    return f"  {name:<34} {formula:<58} {gib:8.2f}"


def format_plan(plan: Plan, title: str = "") -> str:
    """The plan as text: inputs, every term with its arithmetic, the verdict and the alternatives."""
    s, a, hw = plan.inputs, plan.inputs.arch, plan.hardware
    n_forward = s.responses_per_forward
    b, lp, lr = s.micro_batch, s.prompt_len, s.response_len
    tokens_formula = (f"B x (Lp + n x Lr) = {b} x ({lp} + {n_forward} x {lr})" if s.prefix_sharing else
                      f"B x n x (Lp + Lr) = {b} x {n_forward} x ({lp} + {lr})")
    if s.token_budget:
        tokens_formula = f"max(train.token_budget, one group) = max({s.token_budget}, {s.group_tokens})"
    lines = [f"raypo plan{': ' + title if title else ''}",
             f"  model    {a.name} (from {plan.arch_source}): P = {compact(a.total_params)} parameters, "
             f"largest layer P_L = {compact(a.largest_layer_params)}",
             f"           {a.describe()}",
             f"  cluster  {hw.name}: W = scaling.num_workers = {s.num_gpus} GPUs on {s.num_nodes} node(s) of "
             f"{s.gpus_per_node}; GPU memory "
             + (f"{hw.gpu_memory_gib:g} GiB" if hw.gpu_memory_gib else "unknown")
             + (f", host RAM {hw.cpu_memory_gib:g} GiB/node" if hw.cpu_memory_gib else ""),
             f"  batch    B = {b} prompt(s) x N = {s.responses} responses, n = {n_forward} per forward, "
             f"Lp = {lp}, Lr = {lr}, prefix sharing {'on' if s.prefix_sharing else 'off'}",
             f"           T = {tokens_formula} = {s.tokens} tokens per forward, "
             f"{s.response_tokens} response tokens",
             "",
             f"  {'per GPU':<34} {'formula':<58} {'GiB':>8}"]
    states = model_state_terms(s)
    for t in states:
        lines.append(_row(t.name, t.formula, t.gib))
    ds = zero3_model_states_bytes(a.total_params, a.largest_layer_params, s.num_gpus, s.offload_optimizer,
                                  s.offload_params) / GIB
    if not s.lora_params:
        lines.append(_row("= model states", "DeepSpeed estimate_zero3_model_states_mem_needs", ds))
    for t in plan.terms[len(states):]:
        lines.append(_row(t.name, t.formula, t.gib))
    lines.append(_row("= total", "", plan.total_gib))
    if plan.capacity_gib is not None:
        verdict = "FITS" if plan.fits_gpu else "DOES NOT FIT"
        lines.append(f"  GPU: {plan.total_gib:.2f} GiB of {hw.gpu_memory_gib:g} GiB x {USABLE_FRACTION:.2f}"
                     f" = {plan.capacity_gib:.2f} GiB usable -> {verdict}")
    else:
        lines.append("  GPU: no verdict (name a cluster: plan.node_type, or plan.gpu_memory_gib)")
    lines += ["", f"  {'host RAM per node':<34} {'formula':<58} {'GiB':>8}"]
    lines += [_row(t.name, t.formula, t.gib) for t in plan.host]
    if plan.fits_host is not None:
        lines.append(f"  host: {plan.host_gib:.1f} GiB of {hw.cpu_memory_gib:g} GiB x "
                     f"{HOST_USABLE_FRACTION:.2f} -> {'FITS' if plan.fits_host else 'DOES NOT FIT'}")
    lines += ["", *format_alternatives(plan)]
    if plan.fits is not None:
        lines += ["", f"verdict: {'fits' if plan.fits else 'does NOT fit'} on {hw.name} x {s.num_nodes}"]
        if not plan.fits:
            lines.append("  fixes: more GPUs (scaling.num_workers), gradient checkpointing "
                         "(model.gradient_checkpointing=true), deepspeed.offload_optimizer=true, "
                         "train.reference=precomputed, a smaller train.micro_batch_size or "
                         "train.response_chunk_size")
    return "\n".join(lines)


def format_alternatives(plan: Plan) -> list[str]:
    """Totals per GPU for every offload x checkpointing combination; '*' marks the configured one."""
    s = plan.inputs
    cap = plan.capacity_gib
    usable = f" (usable {cap:.1f}; '!' = does not fit)" if cap else ""
    lines = [f"  alternatives, total GiB per GPU{usable}",
             f"  {'':<28} {'no checkpointing':>18} {'checkpointing':>15}"]
    for label, opt, par in (("no offload", False, False), ("optimizer -> CPU", True, False),
                            ("optimizer + params -> CPU", True, True)):
        cells = []
        for ckpt in (False, True):
            alt = dataclasses.replace(s, offload_optimizer=opt, offload_params=par, checkpointing=ckpt)
            gib = gpu_total_bytes(alt) / GIB
            configured = (opt, par, ckpt) == (s.offload_optimizer, s.offload_params, s.checkpointing)
            mark = "*" if configured else " "
            flag = "!" if cap is not None and gib > cap else " "
            cells.append(f"{gib:.2f}{flag}{mark}")
        lines.append(f"  {label:<28} {cells[0]:>18} {cells[1]:>15}")
    naive = naive_head_bytes(s) / GIB
    chunked = head_terms(s)[0].gib
    lines.append(f"  a naive log-prob head (full [T_resp, V] logits) would take {naive:.2f} GiB instead of "
                 f"{chunked:.2f}")
    if s.online_reference and not s.lora_params:
        ref = sum(t.nbytes for t in reference_terms(s)) / GIB
        lines.append(f"  train.reference=precomputed would save {ref:.2f} GiB per GPU (and ~25 % of step "
                     "FLOPs)")
    return lines
