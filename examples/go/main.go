// A minimal reimage client: runs `reimage DRIVER`, writes one request, reads the events line
// by line, shows progress on stderr, and maps the exit status.
//
//	go run . [-reimage PATH] [-config PATH] DRIVER < request.json
//
// Exit status: 0 done; 1 failed (see the error: what it leaves is in docs/protocol.md,
// "Guarantees"); 2 refused before anything was looked at, nothing changed; 3 the stream ended
// without a result or an error (reimage was killed: run `recover`).
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
)

// Event is one line of reimage's stdout; the fields not listed stay in Raw.
type Event struct {
	Event   string `json:"event"`
	Phase   string `json:"phase"`
	Done    uint64 `json:"done"`
	Total   uint64 `json:"total"`
	Unit    string `json:"unit"`
	Code    string `json:"code"`
	Message string `json:"message"`
	Raw     json.RawMessage `json:"-"`
}

// nothingChanged is reimage's status for a request refused before any storage was looked at.
const nothingChanged = 2

func run(reimage, config, driver string, request []byte) (int, *Event, error) {
	args := []string{"--progress", "never"}
	if config != "" {
		args = append(args, "--config", config)
	}
	args = append(args, "--", driver)
	cmd := exec.Command(reimage, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return 0, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, nil, err
	}
	if _, err := stdin.Write(request); err != nil {
		return 0, nil, err
	}
	stdin.Close()
	var last *Event
	lines := bufio.NewScanner(stdout)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	for lines.Scan() {
		var ev Event
		if err := json.Unmarshal(lines.Bytes(), &ev); err != nil {
			return 0, nil, fmt.Errorf("a line that is not JSON: %w", err)
		}
		ev.Raw = append(json.RawMessage(nil), lines.Bytes()...)
		last = &ev
		switch ev.Event {
		case "progress":
			total := ev.Total
			if total == 0 {
				total = 1
			}
			fmt.Fprintf(os.Stderr, "%s: %d%% of %d %s\n", ev.Phase, ev.Done*100/total, ev.Total, ev.Unit)
		case "warning":
			fmt.Fprintf(os.Stderr, "warning %s: %s\n", ev.Code, ev.Message)
		}
	}
	status := 0
	if err := cmd.Wait(); err != nil {
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			return 0, nil, err
		}
		status = exit.ExitCode()
	}
	return status, last, lines.Err()
}

func main() {
	reimage := flag.String("reimage", "reimage", "the reimage binary")
	config := flag.String("config", "", "reimage's config file")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: reimage-client [-reimage PATH] [-config PATH] DRIVER < request.json")
		os.Exit(2)
	}
	request, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	status, last, err := run(*reimage, *config, flag.Arg(0), request)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	if last == nil || (last.Event != "result" && last.Event != "error") {
		fmt.Fprintf(os.Stderr, "reimage ended without a result (status %d); run recover\n", status)
		os.Exit(3)
	}
	fmt.Println(string(last.Raw))
	if last.Event == "result" {
		os.Exit(0)
	}
	if status == nothingChanged {
		fmt.Fprintf(os.Stderr, "nothing changed: %s: %s\n", last.Code, last.Message)
		os.Exit(2)
	}
	fmt.Fprintf(os.Stderr, "failed: %s: %s\n", last.Code, last.Message)
	os.Exit(1)
}
