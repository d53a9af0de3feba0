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

func (a *app) keyCommand() *cobra.Command {
	var newPasswordFile, kdf string
	newPassword := func() ([]byte, error) {
		if newPasswordFile != "" {
			return readPasswordFile(newPasswordFile)
		}
		return promptPassword("new password", true)
	}
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Manage the passwords (key files) that open the repository",
		Example: `  vmvault key list
  vmvault key add --new-password-file /root/second-password
  vmvault key passwd --new-password-file /etc/vmvault/password.new
  vmvault key remove 1a2b3c4d`,
	}
	cmd.PersistentFlags().StringVar(&newPasswordFile, "new-password-file", "", "file holding the new password (else prompt)")
	cmd.PersistentFlags().StringVar(&kdf, "kdf-params", "", "argon2id parameters t=,m=,p= (default: calibrated)")
	cmd.PersistentFlags().MarkHidden("kdf-params")
	list := &cobra.Command{
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
	// withNewKey opens the repository, reads the new password and runs
	// store (add or replace a key file), reporting the new key's ID.
	withNewKey := func(done string, store func(*repo.Repository, context.Context, []byte, crypto.KDFParams) (string, error)) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, _ []string) error {
			params, err := parseKDF(kdf)
			if err != nil {
				return withCode(exitUsage, err)
			}
			r, err := a.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Backend().Close()
			pw, err := newPassword()
			if err != nil {
				return err
			}
			if params.Time == 0 {
				params = calibrated()
			}
			id, err := store(r, cmd.Context(), pw, params)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, done+"\n", id[:8])
			return nil
		}
	}
	add := &cobra.Command{
		Use: "add", Short: "Add a key file for another password", Args: cobra.NoArgs,
		Example: "  vmvault key add                       # prompts for the new password twice\n  vmvault key add --new-password-file /root/second-password",
		RunE:    withNewKey("added key %s", (*repo.Repository).AddKey),
	}
	remove := &cobra.Command{
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
	passwd := &cobra.Command{
		Use: "passwd", Short: "Change the password of the key in use", Args: cobra.NoArgs,
		Example: "  vmvault key passwd --new-password-file /etc/vmvault/password.new\n  mv /etc/vmvault/password.new /etc/vmvault/password",
		RunE: withNewKey("password changed (new key %s)", func(r *repo.Repository, ctx context.Context, pw []byte, p crypto.KDFParams) (string, error) {
			id, err := r.ChangePassword(ctx, pw, p)
			if err != nil && !errors.Is(err, repo.ErrWrongPassword) {
				err = fmt.Errorf("change password: %w", err)
			}
			return id, err
		}),
	}
	cmd.AddCommand(list, add, remove, passwd)
	return cmd
}
