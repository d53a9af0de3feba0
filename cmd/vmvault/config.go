package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/spf13/cobra"

	"vmvault/config"
)

// configNeed says whether a command needs a configuration file.
type configNeed bool

const (
	configOptional configNeed = false // a missing default file is fine
	configRequired configNeed = true  // a missing file is an error
)

// loadConfig reads the configuration file: --config, else VMVAULT_CONFIG,
// else the default path if it exists. With configRequired, a missing file
// is an error. The repository settings of the file fill in what flags and
// the environment left empty.
func (a *app) loadConfig(need configNeed) (*config.Config, error) {
	if a.cfg != nil {
		return a.cfg, nil
	}
	path := a.configPath
	explicit := path != ""
	if !explicit {
		path = config.DefaultPath
	}
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) && !explicit && need == configOptional {
		return nil, nil
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, withCode(exitError, fmt.Errorf("configuration: %w", err))
	}
	a.cfg = cfg
	r := cfg.Repository
	fill := func(dst *string, v string) {
		if *dst == "" {
			*dst = v
		}
	}
	fill(&a.repoURL, r.URL)
	fill(&a.passwordFile, r.PasswordFile)
	fill(&a.sshKey, r.SSHKey)
	fill(&a.knownHosts, r.KnownHosts)
	fill(&a.cacheDir, r.CacheDir)
	fill(&a.metricsFile, cfg.Log.MetricsFile)
	return cfg, nil
}

func (a *app) configCommand() *cobra.Command {
	var noFiles bool
	cmd := &cobra.Command{
		Use:     "config",
		Short:   "Work with the configuration file",
		Example: "  vmvault config check",
	}
	check := &cobra.Command{
		Use:   "check",
		Short: "Validate the configuration file without touching anything",
		Long: `Parse the configuration (--config, VMVAULT_CONFIG or ` + config.DefaultPath + `),
check every key, value and referenced file (existence, and that secrets are
not readable by others), and print each problem as FILE:LINE: KEY: message.`,
		Example: `  vmvault config check
  vmvault config check --config ./vmvault.toml --no-files`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path := a.configPath
			if path == "" {
				path = config.DefaultPath
			}
			cfg, err := config.LoadWith(path, config.Options{SkipFileChecks: noFiles})
			if err != nil {
				for _, e := range unjoin(err) {
					fmt.Fprintln(a.stdout, e.Error())
				}
				return fmt.Errorf("configuration %s has errors", path)
			}
			fmt.Fprintf(a.stderr, "%s: ok, %d VM(s)\n", path, len(cfg.VMs))
			return nil
		},
	}
	check.Flags().BoolVar(&noFiles, "no-files", false, "do not check that referenced files exist")
	cmd.AddCommand(check)
	return cmd
}

// unjoin splits an errors.Join result.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
