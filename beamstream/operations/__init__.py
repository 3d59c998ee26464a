"""Operations (layer 4): the local cluster and registry launchers, local security, the process monitor
and its scaling rules."""
