"""The control-plane contract: ``pdcluster.proto`` and its generated modules.

Regenerate after editing the .proto with ``make proto``; a test fails when the
committed modules are stale.
"""
