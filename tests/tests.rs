mod format;

mod readers;
