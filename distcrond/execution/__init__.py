"""Running commands on nodes: the runners (local, SSH) and the executor that drives them."""
