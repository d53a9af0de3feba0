package main

import (
	"context"
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"vmvault/crypto"
	"vmvault/repo"
)

// keyFlags are the flags the key subcommands share.
type keyFlags struct {
	newPasswordFile, kdf string
}

// newPassword reads the new password from --new-password-file, or
// prompts for it twice.
func (f *keyFlags) newPassword() ([]byte, error) {
	if f.newPasswordFile != "" {
		return readPasswordFile(f.newPasswordFile)
	}
	return promptPassword("new password", true)
}

func (a *app) keyCommand() *cobra.Command {
	var f keyFlags
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Manage the passwords (key files) that open the repository",
		Example: `  vmvault key list
  vmvault key add --new-password-file /root/second-password
  vmvault key passwd --new-password-file /etc/vmvault/password.new
  vmvault key remove 1a2b3c4d`,
	}
	cmd.PersistentFlags().StringVar(&f.newPasswordFile, "new-password-file", "", "file holding the new password (else prompt)")
	cmd.PersistentFlags().StringVar(&f.kdf, "kdf-params", "", "argon2id parameters t=,m=,p=, or calibrate (default t=3,m=65536,p=4, RFC 9106)")
	cmd.PersistentFlags().MarkHidden("kdf-params")
	add := &cobra.Command{
		Use: "add", Short: "Add a key file for another password (not one already in use)", Args: cobra.NoArgs,
		Example: "  vmvault key add                       # prompts for the new password twice\n  vmvault key add --new-password-file /root/second-password",
		RunE:    a.withNewKey(&f, "added key %s", (*repo.Repository).AddKey),
	}
	passwd := &cobra.Command{
		Use: "passwd", Short: "Change the password: every key file of the old one is replaced", Args: cobra.NoArgs,
		Example: "  vmvault key passwd --new-password-file /etc/vmvault/password.new\n  mv /etc/vmvault/password.new /etc/vmvault/password",
		RunE: a.withNewKey(&f, "password changed (new key %s)", func(r *repo.Repository, ctx context.Context, pw []byte, p crypto.KDFParams) (string, error) {
			id, err := r.ChangePassword(ctx, pw, p)
			if err != nil && !errors.Is(err, repo.ErrWrongPassword) {
				err = fmt.Errorf("change password: %w", err)
			}
			return id, err
		}),
	}
	cmd.AddCommand(a.keyListCommand(), add, a.keyRemoveCommand(), passwd)
	return cmd
}

func (a *app) keyListCommand() *cobra.Command {
	return &cobra.Command{
		Use: "list", Short: "List key files", Args: cobra.NoArgs,
		Example: "  vmvault key list\n  vmvault key list --json",
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := a.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Backend().Close()
			keys, err := r.Keys(cmd.Context())
			if err != nil {
				return err
			}
			if a.jsonOut {
				return printJSON(a.stdout, keys)
			}
			tw := tabwriter.NewWriter(a.textOut(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, " \tID\tUSER\tHOST\tCREATED")
			for _, k := range keys {
				cur := " "
				if k.Current {
					cur = "*"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", cur, k.ID[:8], k.User, k.Host, k.Created.Local().Format("2006-01-02 15:04:05"))
			}
			return tw.Flush()
		},
	}
}

func (a *app) keyRemoveCommand() *cobra.Command {
	return &cobra.Command{
		Use: "remove ID", Short: "Remove a key file (not the one in use)", Args: cobra.ExactArgs(1),
		Example: "  vmvault key list\n  vmvault key remove 1a2b3c4d",
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Backend().Close()
			if err := r.RemoveKey(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "removed key %s\n", args[0])
			return nil
		},
	}
}

// withNewKey opens the repository, reads the new password and runs
// store (add or replace a key file), reporting the new key's ID.
func (a *app) withNewKey(f *keyFlags, done string, store func(*repo.Repository, context.Context, []byte, crypto.KDFParams) (string, error)) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		params, err := parseKDF(f.kdf)
		if err != nil {
			return withCode(exitUsage, err)
		}
		r, err := a.openRepo(cmd.Context())
		if err != nil {
			return err
		}
		defer r.Backend().Close()
		pw, err := f.newPassword()
		if err != nil {
			return err
		}
		id, err := store(r, cmd.Context(), pw, params)
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stderr, done+"\n", id[:8])
		return nil
	}
}
