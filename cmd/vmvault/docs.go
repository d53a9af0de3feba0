package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

func (a *app) docsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "docs",
		Short:   "Generate documentation (man pages)",
		Example: `  vmvault docs man /usr/local/share/man/man1`,
	}
	man := &cobra.Command{
		Use:   "man DIR",
		Short: "Write a man page for every command into DIR",
		Long: `Write vmvault.1 and one page per command (vmvault-backup.1, …) into DIR,
creating it if needed. Afterwards 'man vmvault-backup' works when DIR is in
the manual path (e.g. /usr/local/share/man/man1, then run mandb).`,
		Example: `  vmvault docs man /usr/local/share/man/man1 && mandb -q
  vmvault docs man ./man && man -l ./man/vmvault-backup.1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("man pages: %w", err)
			}
			root := cmd.Root()
			// Pages without a date stay byte-identical between builds.
			root.DisableAutoGenTag = true
			header := &doc.GenManHeader{Title: "VMVAULT", Section: "1", Source: "vmvault " + version, Manual: "vmvault manual"}
			if err := doc.GenManTree(root, header, args[0]); err != nil {
				return fmt.Errorf("man pages: %w", err)
			}
			a.log.Info("wrote man pages", "dir", args[0])
			return nil
		},
	}
	cmd.AddCommand(man)
	return cmd
}

// builtinExamples gives cobra's own commands (help, completion) the
// example every command's --help shows.
var builtinExamples = map[string]string{
	"vmvault help":                  "  vmvault help backup",
	"vmvault completion":            "  vmvault completion bash > /etc/bash_completion.d/vmvault",
	"vmvault completion bash":       "  source <(vmvault completion bash)\n  vmvault completion bash > /etc/bash_completion.d/vmvault",
	"vmvault completion zsh":        "  vmvault completion zsh > \"${fpath[1]}/_vmvault\"",
	"vmvault completion fish":       "  vmvault completion fish > ~/.config/fish/completions/vmvault.fish",
	"vmvault completion powershell": "  vmvault completion powershell | Out-String | Invoke-Expression",
}

// addBuiltinCommands creates cobra's help and completion commands now
// (cobra would add them lazily at Execute) so they get examples too.
func addBuiltinCommands(root *cobra.Command) {
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		if ex, ok := builtinExamples[c.CommandPath()]; ok && c.Example == "" {
			c.Example = ex
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
}
