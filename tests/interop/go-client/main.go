// writ-interop-go: a small go-spiffe v2 client used by writ's interop tests.
// It talks to a SPIFFE Workload API socket exactly as any Go workload would
// and prints one JSON object per line describing what it saw.
package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

type report map[string]any

func emit(r report) {
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

func fail(format string, args ...any) {
	emit(report{"error": fmt.Sprintf(format, args...)})
	os.Exit(1)
}

func main() {
	socket := flag.String("socket", "", "Workload API address, unix:///path")
	mode := flag.String("mode", "x509", "x509 | jwt")
	rotations := flag.Int("rotations", 0, "x509: wait for this many SVID rotations")
	audience := flag.String("audience", "interop", "jwt: audience")
	timeout := flag.Duration("timeout", 60*time.Second, "overall deadline")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	clientOpt := workloadapi.WithClientOptions(workloadapi.WithAddr(*socket))

	switch *mode {
	case "x509":
		source, err := workloadapi.NewX509Source(ctx, clientOpt)
		if err != nil {
			fail("X509Source: %v", err)
		}
		defer source.Close()
		seen := map[string]bool{}
		check := func() string {
			svid, err := source.GetX509SVID()
			if err != nil {
				fail("GetX509SVID: %v", err)
			}
			// Re-parse the raw DER with go-spiffe's own X509-SVID parser, and
			// verify the chain against the bundle the source holds.
			certs, key, err := svid.MarshalRaw()
			if err != nil {
				fail("MarshalRaw: %v", err)
			}
			parsed, err := x509svid.ParseRaw(certs, key)
			if err != nil {
				fail("x509svid.ParseRaw rejected writ's SVID: %v", err)
			}
			if _, _, err := x509svid.Verify(parsed.Certificates, source); err != nil {
				fail("x509svid.Verify: %v", err)
			}
			serial := parsed.Certificates[0].SerialNumber.Text(16)
			if !seen[serial] {
				seen[serial] = true
				emit(report{"event": "svid", "spiffe_id": parsed.ID.String(), "serial": serial,
					"not_after": parsed.Certificates[0].NotAfter.Format(time.RFC3339), "chain": len(parsed.Certificates),
					"key_usage_digital_signature": parsed.Certificates[0].KeyUsage&x509.KeyUsageDigitalSignature != 0})
			}
			return serial
		}
		check()
		for len(seen) < *rotations+1 {
			select {
			case <-ctx.Done():
				fail("saw %d of %d rotations before the deadline", len(seen)-1, *rotations)
			case <-time.After(100 * time.Millisecond):
				check()
			}
		}
		emit(report{"event": "done", "distinct_svids": len(seen)})
	case "jwt":
		source, err := workloadapi.NewJWTSource(ctx, clientOpt)
		if err != nil {
			fail("JWTSource: %v", err)
		}
		defer source.Close()
		svid, err := source.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience})
		if err != nil {
			fail("FetchJWTSVID: %v", err)
		}
		// Validate offline against the JWT bundle writ serves.
		parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), source, []string{*audience})
		if err != nil {
			fail("jwtsvid.ParseAndValidate: %v", err)
		}
		emit(report{"event": "jwt", "spiffe_id": parsed.ID.String(), "audience": parsed.Audience,
			"expiry": parsed.Expiry.Format(time.RFC3339)})
	default:
		fail("unknown mode %q", *mode)
	}
}
