package testmariadb

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

func TestServerLifecycle(t *testing.T) {
	s := New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if err := s.CreateUser(ctx, "backup", "s3cret", "", "RELOAD", "LOCK TABLES"); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("mysql", "backup:s3cret@tcp("+s.Addr+")/")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var grants string
	if err := db.QueryRowContext(ctx, "SHOW GRANTS").Scan(&grants); err != nil {
		t.Fatalf("backup user cannot connect: %v", err)
	}
	if want := "GRANT RELOAD, LOCK TABLES ON *.*"; len(grants) < len(want) || grants[:len(want)] != want {
		t.Errorf("grants = %q, want prefix %q", grants, want)
	}

	bad, err := sql.Open("mysql", "backup:wrong@tcp("+s.Addr+")/")
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	var me *mysql.MySQLError
	if err := bad.PingContext(ctx); !errors.As(err, &me) || me.Number != 1045 {
		t.Errorf("wrong password: got %v, want MySQL error 1045", err)
	}

	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.exited:
	default:
		t.Fatal("mariadbd still running after Stop")
	}
	if err := s.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}
