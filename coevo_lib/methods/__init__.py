"""The paper's other baselines as workbench methods: SRLM (self-rewarding pairs) and Agent-R (revision
trajectories from a tree search). docs/baselines.md says what each follows and where it departs."""
