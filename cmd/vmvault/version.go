package main

import (
	"fmt"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func (a *app) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use: "version", Short: "Print version, commit and Go version", Args: cobra.NoArgs,
		Example: "  vmvault version\n  vmvault version --json",
		RunE: func(cmd *cobra.Command, _ []string) error {
			commit, goVersion := "unknown", "unknown"
			if bi, ok := debug.ReadBuildInfo(); ok {
				goVersion = bi.GoVersion
				for _, s := range bi.Settings {
					if s.Key == "vcs.revision" {
						commit = s.Value
					}
				}
			}
			if a.jsonOut {
				return printJSON(a.stdout, map[string]string{"version": version, "commit": commit, "go": goVersion})
			}
			fmt.Fprintf(a.stdout, "vmvault %s (commit %s, %s)\n", version, commit, goVersion)
			return nil
		},
	}
}
