/*
 * pgjdbc checks run through `pam db access` by tests/integration/test_clients_jdbc.py.
 *
 * pgjdbc is the driver DBeaver and DataGrip use, so each check does what such a
 * tool does: metadata queries on connect, prepared statements (crossing
 * prepareThreshold, so both unnamed and named server statements are used),
 * pipelined batches, transactions, a fetch-size cursor (a named portal read
 * with Execute(max_rows) and PortalSuspended) and Statement.cancel() from
 * another thread (a CancelRequest to the host and port of the connection).
 *
 * Compile: javac -encoding UTF-8 -cp /usr/share/java/postgresql.jar -d DIR PamJdbcCheck.java
 * Usage:   java -cp /usr/share/java/postgresql.jar:DIR PamJdbcCheck JDBC_URL CHECK [TABLE]
 *
 * Prints exactly one JSON object on one line on stdout; the test asserts its
 * values. Unexpected exceptions propagate (stack trace, exit code 1), so a
 * failure shows what the driver saw.
 */

import java.math.BigDecimal;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.time.LocalDate;
import java.time.OffsetDateTime;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicReference;

public final class PamJdbcCheck {
    /** How long the cancel check waits for the sleeping query to show up, in ms. */
    private static final long ACTIVE_WAIT_MS = 30_000;

    private PamJdbcCheck() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: PamJdbcCheck JDBC_URL CHECK [TABLE]");
            System.exit(2);
        }
        String url = args[0];
        String check = args[1];
        String table = args.length > 2 ? args[2] : null;
        Map<String, Object> out;
        try (Connection conn = DriverManager.getConnection(url)) {
            switch (check) {
                case "metadata" -> out = metadata(conn, requireTable(table));
                case "prepared" -> out = prepared(conn, requireTable(table));
                case "batch" -> out = batch(conn, requireTable(table));
                case "batch_error" -> out = batchError(conn, requireTable(table));
                case "rollback" -> out = rollback(conn, requireTable(table));
                case "fetch_size" -> out = fetchSize(conn);
                case "cancel" -> out = cancel(conn, url);
                default -> {
                    System.err.println("unknown check: " + check);
                    System.exit(2);
                    return;
                }
            }
        }
        System.out.println(Json.write(out));
    }

    private static String requireTable(String table) {
        if (table == null || !table.matches("[a-z_][a-z0-9_]*")) {
            throw new IllegalArgumentException("this check needs a lower-case table name");
        }
        return table;
    }

    // --- checks ---------------------------------------------------------------------

    /** What a GUI asks on connect: product, schemas, tables of a schema, columns, keys. */
    static Map<String, Object> metadata(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id integer primary key,"
                    + " name text not null, amount numeric(12,2), created_at timestamptz,"
                    + " payload jsonb, tags text[])");
            st.execute("comment on table " + table + " is 'made by PamJdbcCheck'");
        }
        DatabaseMetaData md = conn.getMetaData();
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("product", md.getDatabaseProductName());
        out.put("user", md.getUserName());
        List<Object> schemas = new ArrayList<>();
        try (ResultSet rs = md.getSchemas()) {
            while (rs.next()) {
                schemas.add(rs.getString("TABLE_SCHEM"));
            }
        }
        out.put("schemas", schemas);
        List<Object> catalogs = new ArrayList<>();
        try (ResultSet rs = md.getCatalogs()) {
            while (rs.next()) {
                catalogs.add(rs.getString("TABLE_CAT"));
            }
        }
        out.put("catalogs", catalogs);
        List<Object> tables = new ArrayList<>();
        try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE"})) {
            while (rs.next()) {
                tables.add(List.of(rs.getString("TABLE_SCHEM"), rs.getString("TABLE_NAME"),
                        rs.getString("TABLE_TYPE"), String.valueOf(rs.getString("REMARKS"))));
            }
        }
        out.put("tables", tables);
        List<Object> columns = new ArrayList<>();
        try (ResultSet rs = md.getColumns(null, "public", table, "%")) {
            while (rs.next()) {
                columns.add(List.of(rs.getInt("ORDINAL_POSITION"), rs.getString("COLUMN_NAME"),
                        rs.getString("TYPE_NAME"), rs.getInt("DATA_TYPE"),
                        rs.getString("IS_NULLABLE")));
            }
        }
        out.put("columns", columns);
        List<Object> keys = new ArrayList<>();
        try (ResultSet rs = md.getPrimaryKeys(null, "public", table)) {
            while (rs.next()) {
                keys.add(rs.getString("COLUMN_NAME"));
            }
        }
        out.put("primary_key", keys);
        return out;
    }

    /**
     * One PreparedStatement of several parameter types, run more times than
     * pgjdbc's prepareThreshold (5), so later runs use a named server statement;
     * then an insert and a read-back of the same values through a table.
     */
    static Map<String, Object> prepared(Connection conn, String table) throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String text = "Grüße, 世界 🐘 'quoted' \\ back";
        OffsetDateTime when = OffsetDateTime.parse("2024-02-29T23:59:58.123456+05:30");
        BigDecimal amount = new BigDecimal("12345678901234567890.0123456789");
        List<Object> rows = new ArrayList<>();
        try (PreparedStatement ps = conn.prepareStatement(
                "select ?::int4 as i, ?::numeric as n, ?::text as t, ?::timestamptz as ts,"
                        + " ?::date as d, ?::bool as b, ?::int8 as big, ?::text is null as isnull")) {
            for (int i = 1; i <= 8; i++) {
                ps.setInt(1, i);
                ps.setBigDecimal(2, amount.add(BigDecimal.valueOf(i)));
                ps.setString(3, text + " #" + i);
                ps.setObject(4, when.plusDays(i));
                ps.setObject(5, LocalDate.of(2024, 1, i));
                ps.setBoolean(6, i % 2 == 0);
                ps.setLong(7, Long.MAX_VALUE - i);
                ps.setNull(8, java.sql.Types.VARCHAR);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        rows.add(List.of(rs.getInt("i"), rs.getBigDecimal("n").toPlainString(),
                                rs.getString("t"),
                                rs.getObject("ts", OffsetDateTime.class).toInstant().toString(),
                                rs.getObject("d", LocalDate.class).toString(), rs.getBoolean("b"),
                                String.valueOf(rs.getLong("big")), rs.getBoolean("isnull")));
                    }
                }
            }
            // pgjdbc names its server-side prepared statements S_<n>.
            try (Statement st = conn.createStatement();
                    ResultSet rs = st.executeQuery("select count(*) from pg_prepared_statements"
                            + " where name like 'S\\_%' and statement like 'select $1::int4 %'")) {
                rs.next();
                out.put("named_statements", rs.getLong(1));
            }
        }
        try (Statement st = conn.createStatement()) {
            st.execute("create table " + table
                    + " (id int primary key, label text, amount numeric, at timestamptz)");
        }
        try (PreparedStatement ins = conn.prepareStatement(
                "insert into " + table + " (id, label, amount, at) values (?, ?, ?, ?)")) {
            ins.setInt(1, 1);
            ins.setString(2, text);
            ins.setBigDecimal(3, amount);
            ins.setObject(4, when);
            ins.executeUpdate();
        }
        List<Object> stored = new ArrayList<>();
        try (PreparedStatement sel = conn.prepareStatement(
                "select id, label, amount, at, octet_length(label) from " + table
                        + " where label = ? and amount = ?")) {
            sel.setString(1, text);
            sel.setBigDecimal(2, amount);
            try (ResultSet rs = sel.executeQuery()) {
                while (rs.next()) {
                    stored.add(List.of(rs.getInt(1), rs.getString(2),
                            rs.getBigDecimal(3).toPlainString(),
                            rs.getObject(4, OffsetDateTime.class).toInstant().toString(),
                            rs.getInt(5)));
                }
            }
        }
        out.put("rows", rows);
        out.put("stored", stored);
        return out;
    }

    /** 1000 inserts with addBatch/executeBatch; pgjdbc pipelines them before one Sync. */
    static Map<String, Object> batch(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int primary key, label text)");
        }
        conn.setAutoCommit(false);
        int[] counts;
        try (PreparedStatement ps = conn.prepareStatement(
                "insert into " + table + " (id, label) values (?, ?)")) {
            for (int i = 1; i <= 1000; i++) {
                ps.setInt(1, i);
                ps.setString(2, "row " + i);
                ps.addBatch();
            }
            counts = ps.executeBatch();
        }
        conn.commit();
        conn.setAutoCommit(true);
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("counts_length", counts.length);
        out.put("counts_distinct", distinct(counts));
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select count(*), sum(id), min(label), max(id),"
                        + " count(*) filter (where label = 'row ' || id) from " + table)) {
            rs.next();
            out.put("count", rs.getLong(1));
            out.put("sum", rs.getLong(2));
            out.put("min_label", rs.getString(3));
            out.put("max_id", rs.getInt(4));
            out.put("matching_labels", rs.getLong(5));
        }
        return out;
    }

    /**
     * A batch whose 500th insert violates the primary key: the server skips the rest
     * until Sync, the driver reports BatchUpdateException 23505, and after a
     * rollback the table is empty and the connection usable.
     */
    static Map<String, Object> batchError(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int primary key)");
        }
        conn.setAutoCommit(false);
        Map<String, Object> out = new LinkedHashMap<>();
        try (PreparedStatement ps = conn.prepareStatement(
                "insert into " + table + " (id) values (?)")) {
            for (int i = 1; i <= 1000; i++) {
                ps.setInt(1, i == 500 ? 1 : i);
                ps.addBatch();
            }
            ps.executeBatch();
            out.put("raised", false);
        } catch (BatchUpdateException exc) {
            out.put("raised", true);
            out.put("sqlstate", exc.getSQLState());
            SQLException next = exc.getNextException();
            out.put("next_sqlstate", next == null ? null : next.getSQLState());
        }
        conn.rollback();
        conn.setAutoCommit(true);
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select count(*) from " + table)) {
            rs.next();
            out.put("count_after_rollback", rs.getLong(1));
        }
        return out;
    }

    /** Autocommit off: an insert is seen inside its transaction and gone after rollback. */
    static Map<String, Object> rollback(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create table " + table + " (id int primary key, label text)");
        }
        Map<String, Object> out = new LinkedHashMap<>();
        conn.setAutoCommit(false);
        try (PreparedStatement ins = conn.prepareStatement(
                "insert into " + table + " (id, label) values (?, ?)")) {
            ins.setInt(1, 1);
            ins.setString(2, "rolled back");
            ins.executeUpdate();
            out.put("in_transaction", count(conn, table));
            conn.rollback();
            out.put("after_rollback", count(conn, table));
            ins.setInt(1, 2);
            ins.setString(2, "kept");
            ins.executeUpdate();
            Savepoint savepoint = conn.setSavepoint("before_three");
            ins.setInt(1, 3);
            ins.setString(2, "rolled back to savepoint");
            ins.executeUpdate();
            conn.rollback(savepoint);
            conn.commit();
        }
        conn.setAutoCommit(true);
        List<Object> rows = new ArrayList<>();
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select id, label from " + table + " order by id")) {
            while (rs.next()) {
                rows.add(List.of(rs.getInt(1), rs.getString(2)));
            }
        }
        out.put("committed_rows", rows);
        return out;
    }

    /**
     * setFetchSize(50) inside a transaction: pgjdbc binds a named portal and reads
     * it 50 rows at a time (Execute with max_rows, PortalSuspended). Midway, the
     * portal is looked up in pg_cursors on the same connection, proving the rows
     * are coming from a suspended server-side portal and not one buffered result.
     */
    static Map<String, Object> fetchSize(Connection conn) throws SQLException {
        conn.setAutoCommit(false);
        Map<String, Object> out = new LinkedHashMap<>();
        long count = 0;
        long sum = 0;
        boolean inOrder = true;
        int previous = 0;
        String firstLabel = null;
        String lastLabel = null;
        try (Statement st = conn.createStatement()) {
            st.setFetchSize(50);
            try (ResultSet rs = st.executeQuery(
                    "select g, 'row ' || g from generate_series(1, 5000) as g")) {
                while (rs.next()) {
                    int g = rs.getInt(1);
                    count++;
                    sum += g;
                    inOrder &= g == previous + 1;
                    previous = g;
                    if (firstLabel == null) {
                        firstLabel = rs.getString(2);
                    }
                    lastLabel = rs.getString(2);
                    if (count == 100) {
                        out.put("open_portals_midway", openPortals(conn));
                    }
                }
            }
        }
        conn.commit();
        conn.setAutoCommit(true);
        out.put("count", count);
        out.put("sum", sum);
        out.put("in_order", inOrder);
        out.put("first", firstLabel);
        out.put("last", lastLabel);
        out.put("open_portals_after", openPortals(conn));
        return out;
    }

    /**
     * Statement.cancel() from another thread while `select pg_sleep(60)` runs. The
     * canceller waits until a second connection sees the sleep active in
     * pg_stat_activity, so the CancelRequest cannot race the query's start.
     */
    static Map<String, Object> cancel(Connection conn, String url) throws Exception {
        int pid;
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select pg_backend_pid()")) {
            rs.next();
            pid = rs.getInt(1);
        }
        Map<String, Object> out = new LinkedHashMap<>();
        AtomicReference<Throwable> cancellerFailure = new AtomicReference<>();
        try (Connection observer = DriverManager.getConnection(url);
                Statement sleeper = conn.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    waitUntilActive(observer, pid);
                    sleeper.cancel();
                } catch (Throwable exc) {
                    cancellerFailure.set(exc);
                }
            }, "canceller");
            canceller.start();
            long started = System.nanoTime();
            try {
                sleeper.execute("select pg_sleep(60)");
                out.put("raised", false);
            } catch (SQLException exc) {
                out.put("raised", true);
                out.put("sqlstate", exc.getSQLState());
                out.put("message", exc.getMessage());
            }
            // Informational only; the test asserts the outcome, not the time.
            out.put("elapsed_ms", (System.nanoTime() - started) / 1_000_000);
            canceller.join();
            try (Statement st = observer.createStatement();
                    ResultSet rs = st.executeQuery("select 'observer still here'")) {
                rs.next();
                out.put("observer_after", rs.getString(1));
            }
        }
        if (cancellerFailure.get() != null) {
            throw new RuntimeException("the canceller thread failed", cancellerFailure.get());
        }
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select 'still here', pg_backend_pid()")) {
            rs.next();
            out.put("after", rs.getString(1));
            out.put("same_backend", rs.getInt(2) == pid);
        }
        return out;
    }

    // --- helpers --------------------------------------------------------------------

    private static void waitUntilActive(Connection observer, int pid) throws Exception {
        long deadline = System.nanoTime() + ACTIVE_WAIT_MS * 1_000_000;
        try (PreparedStatement ps = observer.prepareStatement(
                "select count(*) from pg_stat_activity where pid = ? and state = 'active'"
                        + " and query = 'select pg_sleep(60)'")) {
            ps.setInt(1, pid);
            while (System.nanoTime() < deadline) {
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getLong(1) == 1) {
                        return;
                    }
                }
                Thread.sleep(20);
            }
        }
        throw new IllegalStateException("pg_sleep(60) never became active on backend " + pid);
    }

    private static long openPortals(Connection conn) throws SQLException {
        // pgjdbc names the portals of fetch-size cursors C_<n>.
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery(
                        "select count(*) from pg_cursors where name like 'C\\_%'")) {
            rs.next();
            return rs.getLong(1);
        }
    }

    private static long count(Connection conn, String table) throws SQLException {
        try (Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("select count(*) from " + table)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    private static List<Object> distinct(int[] values) {
        List<Object> seen = new ArrayList<>();
        for (int v : values) {
            if (!seen.contains(v)) {
                seen.add(v);
            }
        }
        return seen;
    }

    /** Just enough JSON for the values above: maps, lists, strings, numbers, booleans, null. */
    static final class Json {
        private Json() {}

        static String write(Object value) {
            StringBuilder sb = new StringBuilder();
            append(sb, value);
            return sb.toString();
        }

        private static void append(StringBuilder sb, Object value) {
            if (value == null) {
                sb.append("null");
            } else if (value instanceof String s) {
                appendString(sb, s);
            } else if (value instanceof Number || value instanceof Boolean) {
                sb.append(value);
            } else if (value instanceof Map<?, ?> map) {
                sb.append('{');
                boolean first = true;
                for (Map.Entry<?, ?> e : map.entrySet()) {
                    if (!first) {
                        sb.append(',');
                    }
                    first = false;
                    appendString(sb, String.valueOf(e.getKey()));
                    sb.append(':');
                    append(sb, e.getValue());
                }
                sb.append('}');
            } else if (value instanceof List<?> list) {
                sb.append('[');
                for (int i = 0; i < list.size(); i++) {
                    if (i > 0) {
                        sb.append(',');
                    }
                    append(sb, list.get(i));
                }
                sb.append(']');
            } else {
                throw new IllegalArgumentException("not JSON: " + value.getClass());
            }
        }

        private static void appendString(StringBuilder sb, String s) {
            sb.append('"');
            for (int i = 0; i < s.length(); i++) {
                char c = s.charAt(i);
                switch (c) {
                    case '"' -> sb.append("\\\"");
                    case '\\' -> sb.append("\\\\");
                    case '\n' -> sb.append("\\n");
                    case '\r' -> sb.append("\\r");
                    case '\t' -> sb.append("\\t");
                    default -> {
                        // Escaped, so the output does not depend on the JVM's stdout encoding.
                        if (c < 0x20 || c > 0x7e) {
                            sb.append(String.format("\\u%04x", (int) c));
                        } else {
                            sb.append(c);
                        }
                    }
                }
            }
            sb.append('"');
        }
    }
}
