"""Load for tests that must hold on a busy machine: stalled workers, burned cores."""
