// Unit tests of the file classification table (DESIGN §4) and path normalization.
#include <gtest/gtest.h>

#include "cmk_lakebase/base/fileclass.hpp"

using namespace cmk;

namespace {
struct Case {
    const char* path;
    FileClass cls;
};
}  // namespace

TEST(FileClass, Table) {
    const Case cases[] = {
        // relations: all forks, segments, catalogs, tablespaces
        {"base/5/16384", FileClass::Relation},
        {"base/5/16384.1", FileClass::Relation},
        {"base/5/16384_fsm", FileClass::Relation},
        {"base/5/16384_vm", FileClass::Relation},
        {"base/5/16384_init", FileClass::Relation},
        {"base/5/16384_vm.12", FileClass::Relation},
        {"base/1/1259", FileClass::Relation},
        {"global/1262", FileClass::Relation},
        {"global/1262_fsm", FileClass::Relation},
        {"pg_tblspc/16390/PG_15_202209061/5/16391", FileClass::Relation},
        {"pg_tblspc/16390/PG_15_202209061/5/16391.3", FileClass::Relation},
        {"pg_tblspc/16390/PG_15_202209061/5/16391_fsm", FileClass::Relation},
        // 17+: incremental backups' relation files
        {"base/5/INCREMENTAL.16384", FileClass::Relation},
        {"base/5/INCREMENTAL.16384.1", FileClass::Relation},
        {"base/5/INCREMENTAL.16384_vm", FileClass::Relation},
        {"global/INCREMENTAL.1262", FileClass::Relation},
        {"pg_tblspc/16390/PG_17_202406281/5/INCREMENTAL.16391", FileClass::Relation},
        {"base/5/INCREMENTAL.", FileClass::Plaintext},
        {"base/5/INCREMENTAL.x", FileClass::Plaintext},
        {"base/5/INCREMENTAL.PG_VERSION", FileClass::Plaintext},
        {"INCREMENTAL.16384", FileClass::Plaintext},
        // relation-like names that are not relation files
        {"base/5/16384_foo", FileClass::Plaintext},
        {"base/5/16384.", FileClass::Plaintext},
        {"base/5/16384.x", FileClass::Plaintext},
        {"base/5/abc", FileClass::Plaintext},
        {"base/5/PG_VERSION", FileClass::Plaintext},
        {"base/5/pg_filenode.map", FileClass::Plaintext},
        {"base/5/pg_internal.init", FileClass::Plaintext},
        {"base/5/pg_internal.init.1234", FileClass::Plaintext},
        {"base/x5/16384", FileClass::Plaintext},
        {"base/5", FileClass::Plaintext},
        {"global/pg_control", FileClass::Plaintext},
        {"global/pg_filenode.map", FileClass::Plaintext},
        {"global/pg_internal.init", FileClass::Plaintext},
        {"pg_tblspc/16390", FileClass::Plaintext},
        {"pg_tblspc/16390/PG_15_202209061/5/PG_VERSION", FileClass::Plaintext},
        {"pg_tblspc/16390/NOTPG/5/16391", FileClass::Plaintext},
        // temp relations
        {"base/5/t3_16384", FileClass::TempRelation},
        {"base/5/t3_16384.2", FileClass::TempRelation},
        {"base/5/t12_16384_fsm", FileClass::TempRelation},
        {"base/5/t12_16384_vm", FileClass::TempRelation},
        {"pg_tblspc/16390/PG_15_202209061/5/t3_16400", FileClass::TempRelation},
        {"base/5/t_16384", FileClass::Plaintext},
        {"base/5/t3", FileClass::Plaintext},
        // temp files
        {"base/pgsql_tmp/pgsql_tmp1234.0", FileClass::TempFile},
        {"base/pgsql_tmp/pgsql_tmp1234.12", FileClass::TempFile},
        {"base/pgsql_tmp/pgsql_tmp1234.0.fileset/i0of2.p0.0", FileClass::TempFile},
        {"base/pgsql_tmp/pgsql_tmp1234.0.sharedfileset/o12of16.p1.0", FileClass::TempFile},
        {"pg_tblspc/16390/PG_15_202209061/pgsql_tmp/pgsql_tmp4242.7", FileClass::TempFile},
        {"pg_tblspc/16390/PG_15_202209061/pgsql_tmp/pgsql_tmp4242.7.fileset/x.0", FileClass::TempFile},
        // WAL
        {"pg_wal/000000010000000000000001", FileClass::Wal},
        {"pg_wal/00000002000000A0000000FF", FileClass::Wal},
        {"pg_wal/000000010000000000000001.partial", FileClass::Wal},
        {"pg_wal/xlogtemp.12345", FileClass::Wal},
        {"pg_wal/RECOVERYXLOG", FileClass::Wal},
        {"pg_wal/00000002.history", FileClass::Plaintext},
        {"pg_wal/000000010000000000000002.00000028.backup", FileClass::Plaintext},
        {"pg_wal/archive_status/000000010000000000000001.done", FileClass::Plaintext},
        {"pg_wal/archive_status/000000010000000000000001.ready", FileClass::Plaintext},
        // 17+: WAL summaries (summarize_wal), block numbers of changed blocks only
        {"pg_wal/summaries/0000000100000000010000280000000001000100.summary", FileClass::Plaintext},
        {"pg_wal/summaries/temp.summary", FileClass::Plaintext},
        // 19: SNI host configuration, read through stdio
        {"pg_hosts.conf", FileClass::Plaintext},
        {"pg_wal/RECOVERYHISTORY", FileClass::Plaintext},
        {"pg_wal/xlogtemp.", FileClass::Plaintext},
        {"pg_wal/00000001000000000000001", FileClass::Plaintext},
        {"pg_wal/0000000100000000000000G1", FileClass::Plaintext},
        // SLRUs
        {"pg_xact/0000", FileClass::Slru},
        {"pg_multixact/offsets/0000", FileClass::Slru},
        {"pg_multixact/members/0000", FileClass::Slru},
        {"pg_subtrans/0000", FileClass::Slru},
        {"pg_commit_ts/0000", FileClass::Slru},
        {"pg_serial/0000", FileClass::Slru},
        {"pg_multixact/0000", FileClass::Plaintext},
        // notify, spill, two-phase
        {"pg_notify/0000", FileClass::Notify},
        {"pg_replslot/myslot/xid-750-lsn-0-1000000.spill", FileClass::Spill},
        {"pg_replslot/myslot/state", FileClass::Plaintext},
        {"pg_replslot/myslot", FileClass::Plaintext},
        {"pg_twophase/000002E5", FileClass::TwoPhase},
        {"pg_twophase/00000000000002E5", FileClass::TwoPhase},
        {"pg_twophase/notes.tmp", FileClass::Plaintext},
        // pg_stat_statements (contrib): dump file (and its .tmp), query texts
        {"pg_stat/pg_stat_statements.stat", FileClass::ExtensionState},
        {"pg_stat/pg_stat_statements.stat.tmp", FileClass::ExtensionState},
        {"pg_stat_tmp/pgss_query_texts.stat", FileClass::ExtensionTemp},
        {"pg_stat/pgss_query_texts.stat", FileClass::Plaintext},
        {"pg_stat_tmp/pg_stat_statements.stat", FileClass::Plaintext},
        {"pg_stat/sub/pg_stat_statements.stat", FileClass::Plaintext},
        {"base/5/pg_stat_statements.stat", FileClass::Plaintext},
        {"pg_stat/pg_stat_statements.stat.old", FileClass::Plaintext},
        {"autoprewarm.blocks", FileClass::Plaintext},
        {"autoprewarm.blocks.tmp", FileClass::Plaintext},
        // documented plaintext
        {"PG_VERSION", FileClass::Plaintext},
        {"postgresql.conf", FileClass::Plaintext},
        {"postgresql.auto.conf", FileClass::Plaintext},
        {"pg_hba.conf", FileClass::Plaintext},
        {"pg_ident.conf", FileClass::Plaintext},
        {"postmaster.pid", FileClass::Plaintext},
        {"postmaster.opts", FileClass::Plaintext},
        {"backup_label", FileClass::Plaintext},
        {"tablespace_map", FileClass::Plaintext},
        {"pg_logical/replorigin_checkpoint", FileClass::Plaintext},
        {"pg_logical/snapshots/0-16B3748.snap", FileClass::Plaintext},
        {"pg_stat/pgstat.stat", FileClass::Plaintext},
        {"pg_stat_tmp/global.stat", FileClass::Plaintext},
        {"pg_snapshots/00000003-00000002-1", FileClass::Plaintext},
        {"pg_dynshmem/mmap.12345", FileClass::Plaintext},
        {"cmk_lakebase/keymap", FileClass::Plaintext},
        {"cmk_lakebase/keyring.json", FileClass::Plaintext},
        {"log/postgresql-2024-01-01.log", FileClass::Plaintext},
        {"current_logfiles", FileClass::Plaintext},
        {"", FileClass::Plaintext},
        {"something/unknown", FileClass::Plaintext},
    };
    for (const auto& c : cases) {
        EXPECT_EQ(classify_relative(c.path), c.cls)
            << c.path << " classified as " << file_class_name(classify_relative(c.path)) << ", expected "
            << file_class_name(c.cls);
    }
}

TEST(FileClass, NamesAndKinds) {
    EXPECT_STREQ(file_class_name(FileClass::Plaintext), "plaintext");
    EXPECT_STREQ(file_class_name(FileClass::Relation), "relation");
    EXPECT_STREQ(file_class_name(FileClass::Wal), "wal");
    EXPECT_STREQ(file_class_name(FileClass::Slru), "slru");
    EXPECT_STREQ(file_class_name(FileClass::TwoPhase), "twophase");
    EXPECT_STREQ(file_class_name(FileClass::TempFile), "temp_file");
    EXPECT_STREQ(file_class_name(FileClass::TempRelation), "temp_relation");
    EXPECT_STREQ(file_class_name(FileClass::Spill), "spill");
    EXPECT_STREQ(file_class_name(FileClass::Notify), "notify");
    EXPECT_STREQ(file_class_name(FileClass::ExtensionState), "extension_state");
    EXPECT_STREQ(file_class_name(FileClass::ExtensionTemp), "extension_temp");
    for (FileClass c : {FileClass::Relation, FileClass::Wal, FileClass::Slru, FileClass::TwoPhase,
                        FileClass::ExtensionState}) {
        EXPECT_TRUE(is_encrypted(c));
        EXPECT_TRUE(is_durable(c));
        EXPECT_FALSE(is_ephemeral(c));
    }
    for (FileClass c : {FileClass::TempFile, FileClass::TempRelation, FileClass::Spill, FileClass::Notify,
                        FileClass::ExtensionTemp}) {
        EXPECT_TRUE(is_encrypted(c));
        EXPECT_FALSE(is_durable(c));
        EXPECT_TRUE(is_ephemeral(c));
    }
    EXPECT_FALSE(is_encrypted(FileClass::Plaintext));
    EXPECT_FALSE(is_durable(FileClass::Plaintext));
    EXPECT_FALSE(is_ephemeral(FileClass::Plaintext));
    // Only the files several backends write at once lock as a whole.
    EXPECT_TRUE(locks_whole_file(FileClass::ExtensionState));
    EXPECT_TRUE(locks_whole_file(FileClass::ExtensionTemp));
    for (FileClass c : {FileClass::Plaintext, FileClass::Relation, FileClass::Wal, FileClass::Slru,
                        FileClass::TwoPhase, FileClass::TempFile, FileClass::Notify})
        EXPECT_FALSE(locks_whole_file(c));
    EXPECT_EQ(kLastFileClass, static_cast<uint8_t>(FileClass::ExtensionTemp));
}

TEST(FileClass, NormalizePath) {
    EXPECT_EQ(normalize_path(""), "");
    EXPECT_EQ(normalize_path("/"), "/");
    EXPECT_EQ(normalize_path("//a//b/"), "/a/b");
    EXPECT_EQ(normalize_path("/a/./b/../c"), "/a/c");
    EXPECT_EQ(normalize_path("/../a"), "/a");
    EXPECT_EQ(normalize_path("a/b/../../c"), "c");
    EXPECT_EQ(normalize_path("./base/5/../5/16384"), "base/5/16384");
    EXPECT_EQ(normalize_path("../x/y"), "../x/y");
    EXPECT_EQ(normalize_path("a/../../x"), "../x");
    EXPECT_EQ(normalize_path("a/.."), ".");
    EXPECT_EQ(normalize_path("pg_wal/./000000010000000000000001"), "pg_wal/000000010000000000000001");
    EXPECT_EQ(classify_relative(normalize_path("base//5/./16384")), FileClass::Relation);
}

// pg_upgrade shares a tablespace location between the old and the new cluster: walks
// of one cluster skip the other major version's directory, and only that.
TEST(FileClass, OtherVersionTablespaceDir) {
    EXPECT_TRUE(other_version_tablespace_dir("pg_tblspc/16641/PG_15_202209061", "17"));
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/16641/PG_17_202406281", "17"));
    EXPECT_TRUE(other_version_tablespace_dir("pg_tblspc/16641/PG_17_202406281", "18"));
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/16641/PG_15_202209061", "15"));
    // "1" must not pass as a prefix of "15"
    EXPECT_TRUE(other_version_tablespace_dir("pg_tblspc/16641/PG_15_202209061", "1"));
    // not a version directory, or not directly under a tablespace: never skipped
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/16641/PG_15_202209061/5", "17"));
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/16641/pgsql_tmp", "17"));
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/x/PG_15_202209061", "17"));
    EXPECT_FALSE(other_version_tablespace_dir("base/PG_15_202209061", "17"));
    EXPECT_FALSE(other_version_tablespace_dir("pg_tblspc/16641/PG_15_202209061", ""));
}
