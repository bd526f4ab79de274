"""Reference proxy for bench/run.py: the sidecar's embedded mitmproxy *without* the sidecar addon.

Same addon set, options and hook dispatch as `sidecar/proxy.py` (core, proxyserver, next_layer,
tlsconfig, errorcheck; lazy connect, no websocket/rawtcp/http3; sidecar/mitm_tuning.py), so the gap between this row and the
sidecar's rows is what the sidecar's own code costs per request.

    python bench/lean_mitmproxy.py UPSTREAM_PORT LISTEN_PORT CONFDIR
"""

import asyncio
import sys
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.mitm_tuning import lean_hook_dispatch, skip_message_typecheck  # noqa: E402


async def main(upstream_port: int, listen_port: int, confdir: str) -> None:
    m = Master(options.Options())
    skip_message_typecheck()
    lean_hook_dispatch(m.addons)
    m.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                 errorcheck.ErrorCheck())
    m.options.update(mode=[f"reverse:http://127.0.0.1:{upstream_port}"], listen_host="127.0.0.1",
                     listen_port=listen_port, rawtcp=False, websocket=False, http3=False,
                     keep_host_header=True, connection_strategy="lazy", upstream_cert=False,
                     confdir=confdir)
    await m.run()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
