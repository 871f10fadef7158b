"""writ interop peer: py-spiffe (PyPI package `spiffe`) against a Workload API
socket. Prints one JSON object per line; exits non-zero on any failure."""

import json
import sys

from spiffe import TrustDomain, WorkloadApiClient


def emit(**fields):
    print(json.dumps(fields), flush=True)


def main() -> int:
    socket, mode = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=socket, default_timeout=30)
    try:
        if mode == "x509":
            svids = client.fetch_x509_svids()
            context = client.fetch_x509_context()
            bundles = client.fetch_x509_bundles()
            td = svids[0].spiffe_id.trust_domain
            bundle = bundles.get_bundle_for_trust_domain(td)
            emit(
                event="x509",
                spiffe_ids=[str(s.spiffe_id) for s in svids],
                chain_lengths=[len(s.cert_chain) for s in svids],
                context_default=str(context.default_svid.spiffe_id),
                bundle_trust_domain=str(td),
                bundle_authorities=len(bundle.x509_authorities) if bundle else 0,
            )
        elif mode == "jwt":
            audience = sys.argv[3]
            svid = client.fetch_jwt_svid(audience={audience})
            bundles = client.fetch_jwt_bundles()
            td = svid.spiffe_id.trust_domain
            bundle = bundles.get_bundle_for_trust_domain(td)
            # Offline validation against the bundle writ serves...
            from spiffe import JwtSvid

            parsed = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
            # ...and online validation through the Workload API.
            validated = client.validate_jwt_svid(svid.token, audience)
            emit(
                event="jwt",
                spiffe_id=str(parsed.spiffe_id),
                audience=sorted(parsed.audience),
                validated_spiffe_id=str(validated.spiffe_id),
                jwt_authorities=len(bundle.jwt_authorities) if bundle else 0,
            )
        else:
            emit(error=f"unknown mode {mode}")
            return 2
    except Exception as e:  # report, then fail
        emit(error=f"{type(e).__name__}: {e}")
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
